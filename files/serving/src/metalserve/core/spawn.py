"""The engine's process, started as soon as ``serve`` knows it wants one: its interpreter and
its imports (torch: 1-2 s) then run beside the API process's own (FastAPI, uvicorn, the app:
0.3-0.6 s) instead of after them. ``client.RemoteEngine.start`` takes it over (or starts one
itself, as tests do). Kept free of heavy imports: ``cli`` imports it before FastAPI's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection

from metalserve import sdnotify


@dataclass
class EngineProcess:
    """A started engine process and the API's end of its socket."""

    process: subprocess.Popen[bytes]
    conn: Connection

    def abandon(self) -> None:
        """Not used after all (the API failed to start): nothing was asked of it, so it is
        killed, not left to read EOF after its imports."""
        self.conn.close()
        self.process.kill()
        self.process.wait()


def spawn_engine_process() -> EngineProcess:
    """``python -m metalserve.core.process FD``, ``FD`` its end of a new socket pair."""
    ours, theirs = socket.socketpair()
    # Started before the API reads (and removes) systemd's variables: they are its alone.
    env = {k: v for k, v in os.environ.items() if k not in sdnotify.ENV_VARIABLES}
    with theirs:
        process = subprocess.Popen(
            # -P: not the working directory's modules first on the path.
            [sys.executable, "-P", "-m", "metalserve.core.process", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            env=env,
        )
    return EngineProcess(process, Connection(ours.detach()))
