"""Launch the HTTP server: ``python -m cubeserve.launch_server`` or ``cubeserve serve``.

Flags are SGLang's ``launch_server`` flags (see ``cubeserve.server_args``); for example

    python -m cubeserve.launch_server --model-path /models/quicksviewer --port 8000 --api-key $KEY

The API key may also come from the ``CUBESERVE_API_KEY`` environment variable, which keeps it
out of the process list (``ps``) and out of unit files.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from cubeserve.log import configure_logging
from cubeserve.server.http_server import StartupError, serve
from cubeserve.server_args import ServerArgs

API_KEY_ENV = "CUBESERVE_API_KEY"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

logger = logging.getLogger("cubeserve.launch_server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cubeserve serve",
        description="OpenAI-compatible and SGLang-native HTTP server for cubeserve models.",
    )
    ServerArgs.add_cli_args(parser)
    return parser


def parse_server_args(argv: list[str] | None) -> ServerArgs:
    """Flags -> ``ServerArgs``; invalid or not yet implemented options exit with a message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    if args.log_level.lower() not in LOG_LEVELS:
        parser.error(f"--log-level {args.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    for flag, path in (("--model-path", args.model_path), ("--tokenizer-path", args.tokenizer_path)):
        if path is not None and _looks_like_path(path) and not Path(path).expanduser().is_dir():
            parser.error(f"{flag} {path}: no such directory")
    try:
        return ServerArgs.from_cli_args(args)
    except (ValueError, NotImplementedError) as exc:
        parser.error(str(exc))


def _looks_like_path(name: str) -> bool:
    """A filesystem path rather than a model id of the local Hugging Face cache ("org/name")."""
    return name.startswith((os.sep, ".", "~"))


def main(argv: list[str] | None = None) -> int:
    server_args = parse_server_args(argv)
    configure_logging(server_args.log_level)
    try:
        asyncio.run(serve(server_args))
    except StartupError as exc:
        logger.error("cannot start the server: %s", exc)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while draining
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
