"""The ``cubeserve`` command: serve, generate, demo-model, convert."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
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
    engine_kwargs = {k: v for k, v in vars(server_args).items() if k != "extra"}
    started = time.perf_counter()
    print(f"Starting engine ({server_args.model_path or 'demo model'})...", file=sys.stderr, flush=True)
    with Engine(**engine_kwargs) as engine:
        print(f"Engine ready in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
        request = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
        for chunk in engine.generate(**request, sampling_params=_sampling_params(args), stream=True):
            sys.stdout.write(chunk["delta"])
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


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

    generate = commands.add_parser("generate", help="stream one completion to the terminal")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    for flag, value_type in SAMPLING_FLAGS:
        generate.add_argument(flag, type=value_type, default=None)
    generate.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    generate.add_argument("--ignore-eos", action="store_true")
    ServerArgs.add_cli_args(generate)
    generate.set_defaults(handler=_generate)

    demo = commands.add_parser("demo-model", help="write the tiny demo checkpoint to DIR")
    demo.add_argument("dir", metavar="DIR")
    demo.set_defaults(handler=_demo_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
