"""One logging setup for every cubeserve process (HTTP frontend and engine alike)."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Log records of ``level`` and above to stdout (what process supervisors collect)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stdout, force=True)
