"""The engine's next forward passes under torch.profiler (``POST /admin/profile``).

Where a pass's time goes beyond ``metalserve_forward_pass_part_seconds``: every operator the
engine thread ran (its own time on the host, with the gaps between them: Python, waits for the
GIL) and, on CUDA, every kernel's time on the device. The profiler starts and stops on the
engine thread, between two steps, so the host operators are that thread's only (the HTTP side is
not in them); the device's kernels are the whole process's (CUPTI sees every stream). What the
profiler adds to each operator (microseconds) slows the passes it records, so compare its
shares, not its totals, with an unprofiled run. The trace (Chrome's JSON, for Perfetto or
chrome://tracing) and a summary are written off the engine thread once the passes are done.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch.profiler import profile

log = logging.getLogger(__name__)

# Operators and kernels listed in the summary, by their own time on the host and on the device.
TOP_OPERATORS = 20


class PassProfile:
    """One profile: the next ``passes`` forward passes, ending ``max_seconds`` after the request
    at the latest. Its ``future`` has the summary, or fails with why nothing was recorded."""

    def __init__(self, passes: int, max_seconds: float, directory: Path) -> None:
        if passes < 1 or max_seconds <= 0:
            raise ValueError("a profile needs passes >= 1 and max_seconds > 0")
        self.passes = passes
        self.max_seconds = max_seconds
        self.directory = directory
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
        profiler = profile(activities=activities)
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
            summary = summarize(profiler.key_averages(), seconds, self.recorded)
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
    """The profile's host operators by their own (self) time on the host, and its kernels (and
    the device's copies) by their time on the device."""
    from torch.autograd import DeviceType

    # An operator's self device time repeats its kernels' (torch adds each kernel to the
    # operator that launched it): the device's own events are counted, not the operators'.
    on_device = [e for e in events if e.device_type != DeviceType.CPU and not e.is_user_annotation]
    on_host = [e for e in events if e.device_type == DeviceType.CPU]

    def row(event: Any, seconds_key: str, total: float) -> dict[str, Any]:
        return {"name": event.key, "calls": event.count, seconds_key: round(total / 1e6, 6)}

    by_host = sorted(on_host, key=lambda e: e.self_cpu_time_total, reverse=True)
    by_device = sorted(on_device, key=lambda e: e.self_device_time_total, reverse=True)
    return {
        "passes": dict(recorded),
        "seconds": round(seconds, 4),
        # The engine thread's time in operators; the rest of ``seconds`` is Python between
        # them, waits for the GIL, and the idle loop.
        "host_operators_s": round(sum(e.self_cpu_time_total for e in on_host) / 1e6, 6),
        "device_s": round(sum(e.self_device_time_total for e in on_device) / 1e6, 6),
        "top_host": [row(e, "self_host_s", e.self_cpu_time_total) for e in by_host[:TOP_OPERATORS]],
        "top_device": [
            row(e, "device_s", e.self_device_time_total) for e in by_device[:TOP_OPERATORS]
        ],
    }
