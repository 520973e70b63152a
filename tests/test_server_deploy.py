"""deploy/: the start script's command line, the unit file's stop behaviour, the API key from
the environment."""

from __future__ import annotations

import configparser
import os
import subprocess
from pathlib import Path

from cubeserve.launch_server import API_KEY_ENV, parse_server_args
from cubeserve.server.http_server import DRAIN_TIMEOUT_S

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def start_script_command(**env: str) -> list[str]:
    """What deploy/start.sh would exec, with ``echo`` standing in for Python."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CUBESERVE_")}
    result = subprocess.run([str(DEPLOY / "start.sh"), "--log-level", "debug"], capture_output=True, text=True,
                            check=True, env={**clean, "CUBESERVE_PYTHON": "echo", **env})
    return result.stdout.split()


def test_start_script_builds_the_launch_command():
    command = start_script_command(CUBESERVE_MODEL_PATH="/srv/models/m", CUBESERVE_PORT="9000",
                                   CUBESERVE_EXTRA_ARGS="--mem-fraction-static 0.8  --disable-radix-cache",
                                   CUBESERVE_API_KEY="secret")
    assert command == ["-m", "cubeserve.launch_server", "--host", "0.0.0.0", "--port", "9000",
                       "--model-path", "/srv/models/m", "--mem-fraction-static", "0.8", "--disable-radix-cache",
                       "--log-level", "debug"]
    assert "secret" not in command  # read from the environment by the server, never on the command line


def test_start_script_defaults_to_the_demo_model():
    assert "--model-path" not in start_script_command()


def test_unit_file_stops_gracefully():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(DEPLOY / "cubeserve.service")
    service = unit["Service"]
    assert service["ExecStart"].endswith("deploy/start.sh")
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > DRAIN_TIMEOUT_S


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert parse_server_args([]).api_key == "from-env"
    assert parse_server_args(["--api-key", "flag"]).api_key == "flag"
    monkeypatch.delenv(API_KEY_ENV)
    assert parse_server_args([]).api_key is None
