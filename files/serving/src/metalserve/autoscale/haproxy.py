"""HAProxy's runtime API over its admin socket: the servers of a backend, and their weights."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

TIMEOUT_S = 5.0
# srv_op_state 2: running (health checks pass); srv_admin_state 0: no maintenance or drain flag.
RUNNING = 2


class RuntimeAPIError(Exception):
    """The socket could not be reached, or HAProxy refused a command (its message)."""


@dataclass(frozen=True)
class Server:
    name: str
    address: str
    port: int
    weight: int  # now (the runtime API may have changed it)
    initial_weight: int  # the configuration's
    healthy: bool
    drained: bool = False  # in maintenance or drain (lb_drain: a rollout or maintenance)


class RuntimeAPI:
    """One HAProxy's admin socket (``stats socket ... level admin``)."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def servers(self, backend: str, variants: bool = False) -> list[Server]:
        """``show servers state <backend>``, parsed by its header's column names; with
        ``variants``, also those of the backend's A/B variants (``<backend>:<variant>``)."""
        command = "show servers state" if variants else f"show servers state {backend}"
        lines = self.command(command).splitlines()
        header = next((line for line in lines if line.startswith("# ")), None)
        if header is None:
            raise RuntimeAPIError(f"unexpected answer to show servers state: {lines[:3]!r}")
        columns = header[2:].split()
        servers = []
        for line in lines[lines.index(header) + 1 :]:
            if not line.strip():
                continue
            row = dict(zip(columns, line.split(), strict=False))
            name = row.get("be_name") or ""
            if name != backend and not (variants and name.startswith(backend + ":")):
                continue
            try:
                servers.append(
                    Server(
                        name=row["srv_name"],
                        address=row["srv_addr"],
                        port=int(row["srv_port"]),
                        weight=int(row["srv_uweight"]),
                        initial_weight=int(row["srv_iweight"]),
                        healthy=int(row["srv_op_state"]) == RUNNING
                        and row["srv_admin_state"] == "0",
                        drained=row["srv_admin_state"] != "0",
                    )
                )
            except (KeyError, ValueError) as exc:  # a line cut short (e.g. during a reload)
                raise RuntimeAPIError(f"unexpected server line {line!r}: {exc!r}") from exc
        return servers

    def set_weight(self, backend: str, server: str, weight: int) -> None:
        answer = self.command(f"set server {backend}/{server} weight {weight}").strip()
        if answer:  # silence is success
            raise RuntimeAPIError(f"set server {backend}/{server} weight {weight}: {answer}")

    def command(self, line: str) -> str:
        """Send one command, return the whole answer (HAProxy closes the connection after it)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(TIMEOUT_S)
                conn.connect(str(self.socket_path))
                conn.sendall(line.encode() + b"\n")
                chunks = []
                while chunk := conn.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise RuntimeAPIError(f"{self.socket_path}: {exc}") from exc
        return b"".join(chunks).decode(errors="replace")
