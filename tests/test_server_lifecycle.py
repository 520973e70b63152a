"""Real server process: client disconnects free KV slots, a full queue answers 503, SIGTERM
drains running requests. The radix cache is off so freed slots show as an empty KV pool."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_process import REPO_ROOT, ServerProcess

MAX_RUNNING = 2
MAX_QUEUED = 1
LONG = 3000  # tokens: far more than any test waits for


def start_server(demo_cache_dir, tmp_path_factory) -> ServerProcess:
    flags = ["--disable-radix-cache", "--max-total-tokens", "8192", "--max-running-requests", str(MAX_RUNNING),
             "--max-queued-requests", str(MAX_QUEUED), "--served-model-name", "demo"]
    return ServerProcess(flags, demo_cache_dir, tmp_path_factory.mktemp("server") / "server.log")


@pytest.fixture(scope="module")
def server(demo_cache_dir, tmp_path_factory):
    process = start_server(demo_cache_dir, tmp_path_factory)
    yield process
    process.stop()


def engine_state(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def idle(server: ServerProcess) -> bool:
    state = engine_state(server)
    return state["cubeserve_num_running_reqs"] == 0 and state["cubeserve_kv_pool_used_tokens"] == 0


@contextmanager
def long_stream(server: ServerProcess, max_tokens: int = LONG) -> Iterator[Iterator[str]]:
    """An open streaming completion; leaving the block disconnects the client."""
    body = {"model": "demo", "prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True}
    url = f"{server.url}/v1/completions"
    with httpx.Client(timeout=60) as client, client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        yield response.iter_lines()


def test_disconnect_mid_stream_frees_kv(server):
    with long_stream(server) as lines:
        next(line for line in lines if line.startswith("data:"))
        state = engine_state(server)
        assert state["cubeserve_num_running_reqs"] == 1 and state["cubeserve_kv_pool_used_tokens"] > 0
    wait_until(lambda: idle(server))


def test_disconnect_while_waiting_for_full_response_frees_kv(server):
    generated = engine_state(server)["cubeserve_engine_generated_tokens_total"]
    body = {"model": "demo", "prompt": "Hello", "max_tokens": LONG, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))
    wait_until(lambda: idle(server))
    assert engine_state(server)["cubeserve_engine_generated_tokens_total"] - generated < LONG


@contextmanager
def queued_request(server: ServerProcess) -> Iterator[None]:
    """A completion that is sent but not read (it waits in the engine's queue, so no response
    headers would come for a blocking client); leaving the block disconnects."""
    body = json.dumps({"model": "demo", "prompt": "x", "max_tokens": LONG, "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + body)
        yield


def test_full_queue_is_503_with_retry_after(server):
    with ExitStack() as in_flight:
        for _ in range(MAX_RUNNING):
            in_flight.enter_context(long_stream(server))
        in_flight.enter_context(queued_request(server))
        wait_until(lambda: engine_state(server)["cubeserve_num_waiting_reqs"] == MAX_QUEUED)
        refused = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 1})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["type"] == "server_overloaded"
    wait_until(lambda: idle(server))
    assert httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 1},
                      timeout=60).status_code == 200


def test_sigterm_drains_running_requests(demo_cache_dir, tmp_path_factory):
    process = start_server(demo_cache_dir, tmp_path_factory)
    try:
        events = []
        with long_stream(process, max_tokens=200) as lines:
            for line in filter(None, lines):
                if not events:
                    process.terminate()  # mid-stream
                events.append(line)
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        process.process.wait(30)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{process.url}/health")
        assert "Waiting for connections to close" in process.log()  # uvicorn's drain
    finally:
        process.stop()


def launch(*flags: str, module: str = "cubeserve.launch_server") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=120)


@pytest.mark.parametrize("flags, message", [
    (["--tp", "2"], "--tp-size > 1 is not implemented"),
    (["--model-path", "/no/such/model"], "no such directory"),
    (["--log-level", "loud"], "--log-level"),
])
def test_invalid_flags_exit_with_a_message(flags, message):
    result = launch("serve", *flags, module="cubeserve.cli")
    assert result.returncode == 2 and message in result.stderr


def test_busy_port_fails_before_loading_the_model():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = launch("--port", str(busy.getsockname()[1]))
    assert result.returncode == 1 and "cannot listen on 127.0.0.1" in result.stdout
