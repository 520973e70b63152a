"""The wire between the frontend and the engine process, and the process itself.

Both directions are ZMQ PUSH/PULL sockets over ``ipc://`` paths carrying pickled
``io_struct`` messages; the frontend binds, the engine connects. The engine process is
spawned (never forked: CUDA), reports ``EngineInfo`` or its startup exception through a pipe,
exits by itself when its parent dies, and leaves Ctrl-C to its parent.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import zmq

from cubeserve.engine.io_struct import EngineInfo
from cubeserve.log import configure_logging
from cubeserve.server_args import ServerArgs

PARENT_CHECK_INTERVAL_S = 1.0
SHUTDOWN_GRACE_S = 5.0


@dataclass(frozen=True)
class EngineAddresses:
    to_engine: str
    from_engine: str

    @classmethod
    def create(cls) -> EngineAddresses:
        directory = tempfile.mkdtemp(prefix="cubeserve-")
        return cls(f"ipc://{directory}/to_engine", f"ipc://{directory}/from_engine")

    def cleanup(self) -> None:
        shutil.rmtree(Path(self.to_engine.removeprefix("ipc://")).parent, ignore_errors=True)


@dataclass(frozen=True)
class _StartupFailure:
    error: BaseException
    traceback: str


class RemoteTraceback(Exception):
    """The engine process's traceback, chained as the cause of a re-raised startup error."""


def bind(context: zmq.Context, kind: int, address: str) -> zmq.Socket:
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(address)
    return socket


def connect(context: zmq.Context, kind: int, address: str) -> zmq.Socket:
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    return socket


def recv_all(socket: zmq.Socket, block: bool) -> list[Any]:
    """Every message waiting on ``socket``; with ``block``, waits for at least one."""
    messages = []
    if block:
        messages.append(socket.recv_pyobj())
    while True:
        try:
            messages.append(socket.recv_pyobj(zmq.NOBLOCK))
        except zmq.Again:
            return messages


class EngineProcess:
    """The spawned engine process (``Scheduler`` + ``ModelRunner``).

    The constructor returns once the engine is ready (``info``), or re-raises the exception
    that stopped its startup.
    """

    def __init__(self, server_args: ServerArgs, addresses: EngineAddresses) -> None:
        from cubeserve.scheduler.scheduler import run_scheduler_process

        context = mp.get_context("spawn")
        parent_conn, child_conn = context.Pipe(duplex=False)
        self._process = context.Process(
            target=run_scheduler_process,
            args=(server_args, addresses, child_conn, os.getpid()),
            name="cubeserve-engine",
            daemon=True,
        )
        self._process.start()
        child_conn.close()
        try:
            self.info: EngineInfo = self._wait_until_ready(parent_conn)
        except BaseException:
            self.shutdown()
            raise
        finally:
            parent_conn.close()

    def is_alive(self) -> bool:
        return self._process.is_alive()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def exitcode(self) -> int | None:
        return self._process.exitcode

    def shutdown(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(SHUTDOWN_GRACE_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def _wait_until_ready(self, conn: Connection) -> EngineInfo:
        while not conn.poll(PARENT_CHECK_INTERVAL_S):
            if not self._process.is_alive():
                raise RuntimeError(
                    f"the engine process exited with code {self._process.exitcode} during startup"
                )
        try:
            message = conn.recv()
        except EOFError:
            self._process.join(SHUTDOWN_GRACE_S)
            raise RuntimeError(
                f"the engine process exited with code {self._process.exitcode} during startup"
            ) from None
        if isinstance(message, _StartupFailure):
            self._process.join(SHUTDOWN_GRACE_S)  # it exits by itself
            raise message.error from RemoteTraceback(message.traceback)
        return message


def report_startup_failure(conn: Connection, error: BaseException) -> None:
    """Engine side: send ``error`` to the parent, as itself when it pickles."""
    try:
        pickle.dumps(error)
    except Exception:
        error = RuntimeError(f"{type(error).__name__}: {error}")
    conn.send(_StartupFailure(error, traceback.format_exc()))


def init_engine_process(parent_pid: int, log_level: str) -> None:
    """Engine side, first thing: exit with the parent, leave Ctrl-C to it, log like it."""
    _exit_when_parent_dies(parent_pid)
    # Ctrl-C reaches the whole process group; the parent handles it and shuts this process down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Exit through the interpreter on terminate(), so that process-level cleanup runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    configure_logging(log_level)


def _exit_when_parent_dies(parent_pid: int) -> None:
    """A watchdog thread that ends this process once its parent is gone."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_INTERVAL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()
