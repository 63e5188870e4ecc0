"""systemd's notification protocol (sd_notify(3)) and the replica's watchdog pinger.

Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: the service sends newline-separated
``KEY=VALUE`` lines, one datagram each, to that unix socket (an abstract one when the path starts
with ``@``). With ``WatchdogSec=`` it also passes ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``) and
kills the service (SIGABRT, then ``Restart=``) when no ``WATCHDOG=1`` arrives within that time.

Why our own module: the protocol is one ``sendto``. The maintained implementation
(python-systemd's ``systemd.daemon.notify``) is a C extension built against libsystemd's headers,
and the pure-Python packages are unmaintained; this is the few lines we need, tested against a
real socket. Without ``$NOTIFY_SOCKET`` nothing here runs: no socket, no thread.

``Watchdog`` pings only while a progress source (the engine loop's heartbeat) is fresh: younger
than half the watchdog interval. It checks every ``min(1 s, interval / 8)`` and pings at most
every ``interval / 4``. With the unit's 30 s: pings go on while the last beat is under 15 s old,
so a loop that stops beating is killed 36-45 s after its last beat; a single step under 15 s
never pauses the pings, and one of up to ~35 s (``1.25 x interval - 2 s``: the last ping may be
8.5 s before the 15 s mark, the first one after the step comes within a second) is survived.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger(__name__)

# Variables systemd passes; removed from our environment once read (as sd_notify's
# unset_environment), so that child processes do not think they are the service.
ENV_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# A send waits at most this long for room in the socket's queue (systemd reads it at once).
SEND_TIMEOUT_SECONDS = 1.0
# How often the pinger looks at progress and status at most (and without a watchdog).
CHECK_SECONDS = 1.0


def socket_address(value: str) -> str | None:
    """The ``AF_UNIX`` address of a ``$NOTIFY_SOCKET`` value; None when unsupported."""
    if value.startswith("@"):
        return "\0" + value[1:]  # the abstract namespace
    if value.startswith("/"):
        return value
    return None  # e.g. systemd 254+'s vsock: addresses, unused for local services


def watchdog_interval(environ: MutableMapping[str, str]) -> float | None:
    """Seconds of ``$WATCHDOG_USEC`` when the watchdog watches this process, else None."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    try:
        interval = int(usec) / 1e6
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number", usec)
        return None
    if interval <= 0:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (our parent, say)
    return interval


class Notifier:
    """Sends notifications to systemd; every method is a no-op without a socket address."""

    def __init__(self, address: str | None, watchdog_interval: float | None = None) -> None:
        self.address = address
        self.watchdog_interval = watchdog_interval if address is not None else None
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failing = False

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("ignoring NOTIFY_SOCKET=%r: only unix socket paths are supported", raw)
        interval = watchdog_interval(env)
        if unset:
            for name in ENV_VARIABLES:
                env.pop(name, None)
        return cls(address, interval)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False when disabled or it failed."""
        if self.address is None:
            return False
        data = "\n".join(lines).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.settimeout(SEND_TIMEOUT_SECONDS)
                self._sock.sendto(data, self.address)
            except OSError as exc:
                # Loud once, then quiet until a send works again (a ping every few seconds).
                (log.debug if self._failing else log.warning)(
                    "cannot notify systemd (%s): %s", lines[0], exc
                )
                self._failing = True
                return False
            self._failing = False
            return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def ping(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Watchdog:
    """A daemon thread: ``WATCHDOG=1`` while ``progress_age()`` (seconds since the watched loop's
    last progress) is under half the interval; a ``STATUS=`` line whenever ``status()`` changes."""

    def __init__(
        self,
        notifier: Notifier,
        *,
        progress_age: Callable[[], float],
        status: Callable[[], str],
        on_withheld: Callable[[], None] = lambda: None,
    ) -> None:
        self.notifier = notifier
        # Called once a stall starts withholding the pings: the stuck engine's stack goes to
        # the journal then, before systemd's kill can cut a dump at the end short.
        self._on_withheld = on_withheld
        self.interval = notifier.watchdog_interval
        self._progress_age = progress_age
        self._status = status
        if self.interval is not None:
            self.stale_after: float | None = self.interval / 2
            self.ping_every = self.interval / 4
            self.check_every = min(CHECK_SECONDS, self.interval / 8)
        else:
            self.stale_after, self.ping_every, self.check_every = None, 0.0, CHECK_SECONDS
        self.pings = 0
        self._last_ping = float("-inf")
        self._last_status: str | None = None
        self._withheld = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metalserve-watchdog", daemon=True)

    def ready(self) -> bool:
        """Send ``READY=1`` with the current status (then ``start`` the pings)."""
        status = self._status()
        sent = self.notifier.ready(status)
        if sent:
            self._last_status = status
        return sent

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def _run(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # a status callback failing must not end the pings for good
                log.exception("watchdog check failed")
            if self._stop.wait(self.check_every):
                return

    def check(self) -> None:
        """One look: ping when due and fresh, send the status when it changed."""
        status = self._status()
        if self.stale_after is not None:
            age = self._progress_age()
            fresh = age < self.stale_after
            if fresh:
                now = time.monotonic()
                if now - self._last_ping >= self.ping_every and self.notifier.ping():
                    self._last_ping = now
                    self.pings += 1
                if self._withheld:
                    log.warning("the engine loop makes progress again: watchdog pings resume")
            elif not self._withheld:
                log.error(
                    "%s: watchdog pings withheld (systemd restarts the replica %.0fs after the "
                    "last one)",
                    "the engine thread is gone"
                    if age == float("inf")
                    else f"the engine loop made no progress for {age:.1f}s",
                    self.interval,
                )
                self._on_withheld()
            self._withheld = not fresh
            if not fresh:
                status = f"{status}; engine loop stalled, watchdog pings withheld"
        if status != self._last_status and self.notifier.status(status):
            self._last_status = status
