"""The frontend and its engine process: death, signals, logging, control replies and defaults,
with real engine processes on a tiny random checkpoint.

``HANG_GUARD_S`` only bounds what would otherwise hang forever; no test measures time.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from cubeserve.engine.engine import Engine
from cubeserve.engine.io_struct import GenerateReqInput
from cubeserve.engine.tokenizer_manager import EngineDeadError, TokenizerManager
from cubeserve.server_args import ServerArgs

HANG_GUARD_S = 60.0
GREEDY = {"temperature": 0.0, "ignore_eos": True}
CONTEXT_LEN = 40


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("qwen2")


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> Iterator[Engine]:
    with Engine(str(checkpoint), device="cpu", max_total_tokens=1024, context_length=CONTEXT_LEN) as engine:
        yield engine


@asynccontextmanager
async def running_manager(checkpoint: Path, **server_args: Any) -> AsyncIterator[TokenizerManager]:
    args = ServerArgs(model_path=str(checkpoint), device="cpu", max_total_tokens=1024, **server_args)
    manager = TokenizerManager(args)
    await manager.start()
    try:
        yield manager
    finally:
        await manager.shutdown()


async def final_chunk(manager: TokenizerManager, **fields: Any) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        return [chunk async for chunk in manager.generate_request(GenerateReqInput(**fields))][-1]

    return await asyncio.wait_for(run(), HANG_GUARD_S)


def test_requests_fail_fast_once_the_engine_process_is_dead(checkpoint: Path) -> None:
    async def scenario() -> None:
        async with running_manager(checkpoint) as manager:
            os.kill(manager.engine_pid, signal.SIGKILL)
            for _ in range(2):  # in flight when the death is noticed, then sent after it
                with pytest.raises(EngineDeadError, match="exit code -9"):
                    await asyncio.wait_for(manager.get_stats(), HANG_GUARD_S)
            with pytest.raises(EngineDeadError, match="exit code -9"):
                await final_chunk(manager, input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})

    asyncio.run(scenario())


def test_a_cancelled_stats_request_does_not_misroute_later_replies(checkpoint: Path) -> None:
    async def scenario() -> None:
        async with running_manager(checkpoint) as manager:
            abandoned = asyncio.ensure_future(manager.get_stats())
            await asyncio.sleep(0)  # sent; its reply is still to come
            abandoned.cancel()
            await final_chunk(manager, input_ids=[5, 6, 7], sampling_params={**GREEDY, "max_new_tokens": 3})
            stats = await asyncio.wait_for(manager.get_stats(), HANG_GUARD_S)
            assert stats.generated_tokens_total == 3  # the reply to this request, not an older one

    asyncio.run(scenario())


def test_engine_process_ignores_ctrl_c(engine: Engine) -> None:
    os.kill(engine.tokenizer_manager.engine_pid, signal.SIGINT)  # a terminal's Ctrl-C sends it too
    result = engine.generate(input_ids=[1, 2, 3], sampling_params={**GREEDY, "max_new_tokens": 4})
    assert result["meta_info"]["completion_tokens"] == 4


def test_engine_process_logs_to_stdout_like_the_frontend(
    checkpoint: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    async def scenario() -> None:
        async with running_manager(checkpoint, log_level="info"):
            pass

    asyncio.run(scenario())
    log_line = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO cubeserve\.engine\.model_runner: model \w+ on cpu"
    assert re.search(log_line, capfd.readouterr().out, re.MULTILINE)


def test_max_new_tokens_defaults_to_the_rest_of_the_context(engine: Engine) -> None:
    meta = engine.generate(input_ids=list(range(1, 31)), sampling_params=GREEDY)["meta_info"]
    assert meta["completion_tokens"] == CONTEXT_LEN - 30
    assert meta["finish_reason"] == {"type": "length", "matched": None}
    with pytest.raises(ValueError, match="no room for output"):
        engine.generate(input_ids=list(range(1, CONTEXT_LEN + 1)), sampling_params=GREEDY)
