"""The engine's process, started as soon as ``serve`` knows it wants one: its interpreter and
its imports (torch: 1-2 s) then run beside the API process's own (FastAPI, uvicorn, the app:
0.3-0.6 s) instead of after them. ``client.RemoteEngine.start`` takes it over (or starts one
itself, as tests do). Kept free of heavy imports: ``cli`` imports it before FastAPI's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from metalserve import sdnotify


@dataclass
class EngineProcess:
    """A started engine process, the API's end of its socket, and the ends of the sockets its
    other API processes (``serve --api-processes``) will talk to it through."""

    process: subprocess.Popen[bytes]
    conn: Connection
    others: list[socket.socket] = field(default_factory=list)

    def abandon(self) -> None:
        """Not used after all (the API failed to start): nothing was asked of it, so it is
        killed, not left to read EOF after its imports."""
        self.conn.close()
        for end in self.others:
            end.close()
        self.process.kill()
        self.process.wait()


def spawn_engine_process(api_processes: int = 1) -> EngineProcess:
    """``python -m metalserve.core.process FD...``: one end of a new socket pair for each API
    process, the first this one's."""
    pairs = [socket.socketpair() for _ in range(api_processes)]
    theirs = [pair[1] for pair in pairs]
    # Started before the API reads (and removes) systemd's variables: they are its alone.
    env = {k: v for k, v in os.environ.items() if k not in sdnotify.ENV_VARIABLES}
    try:
        process = subprocess.Popen(
            # -P: not the working directory's modules first on the path.
            [
                sys.executable,
                "-P",
                "-m",
                "metalserve.core.process",
                *(str(end.fileno()) for end in theirs),
            ],
            pass_fds=tuple(end.fileno() for end in theirs),
            env=env,
        )
    finally:
        for end in theirs:
            end.close()
    ours = [pair[0] for pair in pairs]
    return EngineProcess(process, Connection(ours[0].detach()), ours[1:])
