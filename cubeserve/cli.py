"""The ``cubeserve`` command: serve, generate, demo-model, convert."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cubeserve.server_args import ServerArgs

# Sampling flags of ``generate``: (flag, type); each maps to the SamplingParams field of the same name.
SAMPLING_FLAGS: tuple[tuple[str, type], ...] = (
    ("--max-new-tokens", int),
    ("--temperature", float),
    ("--top-p", float),
    ("--top-k", int),
    ("--min-p", float),
    ("--repetition-penalty", float),
    ("--frequency-penalty", float),
    ("--presence-penalty", float),
    ("--seed", int),
)


def _serve(argv: Sequence[str]) -> int:
    from cubeserve.launch_server import main as launch_server_main

    return launch_server_main(list(argv))


def _convert(argv: Sequence[str]) -> int:
    from cubeserve.tools.convert import main as convert_main

    return convert_main(list(argv))


# Commands whose arguments belong to another module's parser.
DELEGATED: dict[str, Callable[[Sequence[str]], int]] = {"serve": _serve, "convert": _convert}


def _demo_model(args: argparse.Namespace) -> int:
    from cubeserve.demo import ensure_demo_model

    print(ensure_demo_model(args.dir))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from cubeserve.engine.engine import Engine

    server_args = ServerArgs.from_cli_args(args)
    media = [*args.image, *args.video]
    if media and args.raw:
        raise SystemExit("cubeserve generate: --raw cannot be combined with --image or --video")
    if media and server_args.allowed_local_media_path is None:
        server_args.allowed_local_media_path = os.path.commonpath([path.parent for path in media])
    request = {"prompt": args.prompt} if args.raw else {"messages": _chat_messages(args)}
    started = time.perf_counter()
    print(f"Starting engine ({server_args.model_path or 'demo model'})...", file=sys.stderr, flush=True)
    with Engine.from_server_args(server_args) as engine:
        print(f"Engine ready in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
        try:
            for chunk in engine.generate(**request, sampling_params=_sampling_params(args), stream=True):
                sys.stdout.write(chunk["delta"])
                sys.stdout.flush()
        except ValueError as exc:  # the request was invalid: the message says why
            print(f"error: {exc}", file=sys.stderr)
            return 1
    sys.stdout.write("\n")
    for line in _describe_cubes(chunk["meta_info"].get("mm_meta") or {}):
        print(line, file=sys.stderr)
    return 0


def _describe_cubes(mm_meta: dict[str, Any]) -> list[str]:
    """One line per video: how the model segmented it into cubes."""
    return [
        f"video {i}: {len(cubes)} cubes at "
        + ", ".join(f"{cube['start_time']:.1f}-{cube['end_time']:.1f}s" for cube in cubes)
        for i, cubes in enumerate(mm_meta.get("cubes", []), start=1)
    ]


def _chat_messages(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One user turn: the images, then the videos, then the text (the model's processor and chat
    template turn it into the prompt)."""
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": str(path)}} for path in args.image
    ]
    content += [{"type": "video_url", "video_url": {"url": str(path)}} for path in args.video]
    content.append({"type": "text", "text": args.prompt})
    return [{"role": "user", "content": content}]


def _media_file(value: str) -> Path:
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return path


def _sampling_params(args: argparse.Namespace) -> dict[str, Any]:
    names = [flag[2:].replace("-", "_") for flag, _ in SAMPLING_FLAGS]
    params = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.stop:
        params["stop"] = args.stop
    if args.ignore_eos:
        params["ignore_eos"] = True
    return params


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cubeserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Parsed by their own modules (see DELEGATED); listed here for --help.
    commands.add_parser("serve", help="launch the OpenAI-compatible HTTP server", add_help=False)
    commands.add_parser("convert", help="convert an original Quicksviewer checkpoint", add_help=False)

    generate = commands.add_parser("generate", help="stream one chat reply (or raw completion) to the terminal")
    generate.add_argument("prompt", metavar="PROMPT")
    generate.add_argument("--image", type=_media_file, action="append", default=[], metavar="PATH",
                          help="image file shown before the prompt (repeatable)")
    generate.add_argument("--video", type=_media_file, action="append", default=[], metavar="PATH",
                          help="video file shown before the prompt (repeatable)")
    generate.add_argument("--raw", action="store_true", help="complete PROMPT as is, without the chat template")
    for flag, value_type in SAMPLING_FLAGS:
        generate.add_argument(flag, type=value_type, default=None)
    generate.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    generate.add_argument("--ignore-eos", action="store_true")
    ServerArgs.add_cli_args(generate)
    # stdout carries the answer: only warnings and errors of the engine may join it.
    generate.set_defaults(handler=_generate, log_level="warning")

    demo = commands.add_parser("demo-model", help="write the tiny demo checkpoint to DIR")
    demo.add_argument("dir", metavar="DIR")
    demo.set_defaults(handler=_demo_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:  # Ctrl-C: leaving the Engine's block has shut the engine down
        return 130


if __name__ == "__main__":
    sys.exit(main())
