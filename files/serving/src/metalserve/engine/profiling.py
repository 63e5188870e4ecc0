"""The engine's next forward passes under torch.profiler (``POST /admin/profile``).

Where a pass's time goes beyond ``metalserve_forward_pass_part_seconds``: every operator the
engine thread ran (its own time on the host, with the gaps between them: Python, waits for the
GIL) and, on CUDA, every kernel's time on the device. The profiler starts and stops on the
engine thread, between two steps, so it records that thread's operators only (the HTTP side is
not in it); what it adds to each operator (microseconds) slows the passes it records, so compare
its shares, not its totals, with an unprofiled run. The trace (Chrome's JSON, for Perfetto or
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

# Operators listed in the summary, for each of the host's and the device's time.
TOP_OPERATORS = 20


class PassProfile:
    """One profile: the next ``passes`` forward passes, or what ran in ``max_seconds``."""

    def __init__(self, passes: int, max_seconds: float, directory: Path) -> None:
        if passes < 1 or max_seconds <= 0:
            raise ValueError("a profile needs passes >= 1 and max_seconds > 0")
        self.passes = passes
        self.max_seconds = max_seconds
        self.directory = directory
        self.future: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        self.recorded = {"prefill": 0, "decode": 0}
        self._profiler: profile | None = None
        # From the request until the first recorded pass, then from that pass.
        self._started = time.monotonic()

    def begin(self, device: torch.device) -> None:
        """On the engine thread, before a step on ``device``: start recording (once)."""
        if self._profiler is not None:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        self._profiler = profile(activities=activities)
        self._profiler.start()
        self._started = time.monotonic()

    def count(self, *, prefill: int, decode: int) -> bool:
        """After a step: its passes; True when the profile is complete (then ``end`` it)."""
        self.recorded["prefill"] += prefill
        self.recorded["decode"] += decode
        return sum(self.recorded.values()) >= self.passes or self.expired()

    def expired(self) -> bool:
        """``max_seconds`` passed since the first recorded pass (or, with none, the request)."""
        return time.monotonic() - self._started >= self.max_seconds

    def end(self, unrecorded: str = "no forward pass ran") -> None:
        """On the engine thread: stop recording; the trace and summary follow on a thread of
        their own (seconds for a large trace), then the future has the summary. Nothing
        recorded: the future fails with ``unrecorded``."""
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            self.future.set_exception(RuntimeError(unrecorded))
            return
        profiler.stop()
        seconds = time.monotonic() - self._started
        threading.Thread(
            target=self._finish, args=(profiler, seconds), name="metalserve-profile", daemon=True
        ).start()

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
            log.info("engine profile of %s written to %s", self.recorded, trace)
            self.future.set_result(summary)
        except Exception as exc:  # the caller is told; the engine is not affected
            log.exception("writing the engine profile failed")
            self.future.set_exception(exc)


def summarize(events: list[Any], seconds: float, recorded: dict[str, int]) -> dict[str, Any]:
    """The profile's operators by their own (self) time on the host and on the device."""

    def device_us(event: Any) -> float:
        # torch 2.4 renamed self_cuda_time_total to self_device_time_total.
        total = getattr(event, "self_device_time_total", None)
        return float(total if total is not None else getattr(event, "self_cuda_time_total", 0))

    def row(event: Any) -> dict[str, Any]:
        return {
            "name": event.key,
            "calls": event.count,
            "self_host_s": round(event.self_cpu_time_total / 1e6, 6),
            "self_device_s": round(device_us(event) / 1e6, 6),
        }

    host = sum(e.self_cpu_time_total for e in events) / 1e6
    device = sum(device_us(e) for e in events) / 1e6
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    by_device = sorted((e for e in events if device_us(e) > 0), key=device_us, reverse=True)
    return {
        "passes": dict(recorded),
        "seconds": round(seconds, 4),
        # The engine thread's time in operators; the rest of ``seconds`` is Python between
        # them, waits for the GIL, and the idle loop.
        "host_operators_s": round(host, 4),
        "device_s": round(device, 4),
        "top_host": [row(e) for e in by_host[:TOP_OPERATORS]],
        "top_device": [row(e) for e in by_device[:TOP_OPERATORS]],
    }
