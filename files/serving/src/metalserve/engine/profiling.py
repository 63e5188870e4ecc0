"""The engine's next forward passes under torch.profiler (``POST /admin/profile``).

Where a pass's time goes beyond ``metalserve_forward_pass_part_seconds``: every operator the
engine thread ran (its own time on the host, with the gaps between them: Python, waits for the
GIL), with ``python`` every Python call too, and, on CUDA, every kernel's time on the device. The
profiler starts and stops on the engine thread, between two steps, so the host operators are that
thread's only (the HTTP side is not in them); the device's kernels are the whole process's (CUPTI
sees every stream). What the profiler adds to each operator (microseconds) slows the passes it
records, so compare its shares, not its totals, with an unprofiled run. The trace (Chrome's JSON,
for Perfetto or chrome://tracing) and a summary are written off the engine thread once the passes
are done.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch.profiler import profile

log = logging.getLogger(__name__)

# Python's names of built-ins carry their object's address ("<built-in method acquire of
# _thread.lock object at 0x7f...>"): one row per method, not per object.
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")
# A Python frame of the engine thread (its loop), in the profiler's names of Python calls.
ENGINE_LOOP_FRAME = "metalserve/engine/loop.py("
# Operators and kernels listed in the summary, by their own time on the host and on the device.
TOP_OPERATORS = 20


class PassProfile:
    """One profile: the next ``passes`` forward passes, ending ``max_seconds`` after the request
    at the latest. Its ``future`` has the summary, or fails with why nothing was recorded."""

    def __init__(
        self, passes: int, max_seconds: float, directory: Path, *, python: bool = False
    ) -> None:
        if passes < 1 or max_seconds <= 0:
            raise ValueError("a profile needs passes >= 1 and max_seconds > 0")
        self.passes = passes
        self.max_seconds = max_seconds
        self.directory = directory
        # Python's calls too (with_stack): where the host's time between operators goes. The
        # tracer sees every thread's calls: the whole process slows, on an H200 from 1-20 ms
        # a pass to 29 ms-4 s (2026-12-05).
        self.python = python
        self.future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self.recorded = {"prefill": 0, "decode": 0}
        self._profiler: profile | None = None
        self._requested = time.monotonic()
        self._began = 0.0

    @property
    def began(self) -> bool:
        return self._profiler is not None

    def begin(self, device: torch.device) -> None:
        """On the engine thread, before a step on ``device``: start recording (once)."""
        if self._profiler is not None:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        profiler = profile(activities=activities, with_stack=self.python)
        profiler.start()
        self._profiler, self._began = profiler, time.monotonic()

    def count(self, *, prefill: int, decode: int) -> bool:
        """After a step: its passes; True when the profile is complete (then ``end`` it)."""
        self.recorded["prefill"] += prefill
        self.recorded["decode"] += decode
        return sum(self.recorded.values()) >= self.passes or self.expired()

    def expired(self) -> bool:
        return time.monotonic() - self._requested >= self.max_seconds

    def end(self, unrecorded: str = "no forward pass ran") -> None:
        """On the engine thread: stop recording; the trace and summary follow on a thread of
        their own (seconds for a large trace), then the future has the summary. Nothing
        recorded: the future fails with ``unrecorded``."""
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            self.fail(RuntimeError(unrecorded))
            return
        try:
            profiler.stop()
        except Exception as exc:  # noqa: BLE001 - a CUDA error at its synchronize: the caller is told
            self.fail(exc)
            return
        seconds = time.monotonic() - self._began
        threading.Thread(
            target=self._finish, args=(profiler, seconds), name="metalserve-profile", daemon=True
        ).start()

    def fail(self, exc: BaseException) -> None:
        """The future fails with ``exc`` (unless its caller gave up on it)."""
        if self.future.set_running_or_notify_cancel():
            self.future.set_exception(exc)

    def _finish(self, profiler: profile, seconds: float) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            trace = self.directory / f"engine-{stamp}.json"
            profiler.export_chrome_trace(str(trace))
            summary = summarize(list(profiler.events()), seconds, self.recorded)
            summary["trace"] = str(trace)
            (self.directory / f"engine-{stamp}-summary.json").write_text(
                json.dumps(summary, indent=2) + "\n"
            )
        except Exception as exc:
            log.exception("writing the engine profile failed")
            self.fail(exc)
            return
        log.info("engine profile of %s written to %s", self.recorded, trace)
        if self.future.set_running_or_notify_cancel():
            self.future.set_result(summary)


def summarize(events: list[Any], seconds: float, recorded: dict[str, int]) -> dict[str, Any]:
    """The profile's ``events`` (torch's ``FunctionEvent``): the engine thread's operators and
    Python calls by their own (self) time and with their callees (inclusive), and the device's
    kernels and copies by their time there."""
    from torch.autograd import DeviceType

    # The engine thread is the one that recorded operators (the profiler records those on the
    # thread that started it) and the one running the engine loop's Python; Python's calls and
    # CUDA's runtime calls are every thread's. (Operators and Python calls may carry different
    # thread numbers: torch 2.11 on an H200 listed no Python call under the operators' one.)
    def busiest(marker: Callable[[str], bool]) -> set[int]:
        counts = Counter(
            e.thread for e in events if e.device_type == DeviceType.CPU and marker(e.key)
        )
        return {counts.most_common(1)[0][0]} if counts else set()

    engine = busiest(lambda key: key.startswith("aten::")) | busiest(
        lambda key: ENGINE_LOOP_FRAME in key
    )
    host: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # calls, self, inclusive
    device: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # calls, time
    for e in events:
        if e.device_type == DeviceType.CPU:
            if e.thread in engine:
                row = host[_ADDRESS.sub("", e.key)]
                row[0] += 1
                row[1] += e.self_cpu_time_total
                row[2] += e.cpu_time_total
        elif not e.is_user_annotation:
            # An operator's device time repeats its kernels' (torch adds each kernel to the
            # operator that launched it): the device's own events are counted.
            row = device[e.key]
            row[0] += 1
            row[1] += e.device_time_total

    def top(table: dict[str, list[float]], column: int, name: str) -> list[dict[str, Any]]:
        ranked = sorted(table.items(), key=lambda item: item[1][column], reverse=True)
        return [
            {"name": key, "calls": int(row[0]), name: round(row[column] / 1e6, 6)}
            for key, row in ranked[:TOP_OPERATORS]
        ]

    return {
        "passes": dict(recorded),
        "seconds": round(seconds, 4),
        # The engine thread's own time in what was recorded: operators (and, with ``python``,
        # Python's calls); the rest of ``seconds`` is unrecorded Python, waits for the GIL
        # and the idle loop.
        "host_recorded_s": round(sum(row[1] for row in host.values()) / 1e6, 6),
        "device_s": round(sum(row[1] for row in device.values()) / 1e6, 6),
        "top_host": top(host, 1, "self_host_s"),
        # With Python's calls, a function's time with its callees says which step of a pass
        # takes it (the operators' own time is mostly their launches).
        "top_host_inclusive": top(host, 2, "host_s"),
        "top_device": top(device, 1, "device_s"),
    }
