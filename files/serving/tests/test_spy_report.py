"""``bench/spy_report.py``: a py-spy raw profile summed by thread and function."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "bench" / "spy_report.py"
ENGINE = "process 11:python -P -m metalserve.core.process 5"
API = "process 10:python -m metalserve serve"
LOAD = "thread (0x1): metalserve-load"
STREAM = "thread (0x2): metalserve-weights"
LOAD_VERSION = "load_version (metalserve/loader.py:{})"
STREAM_FRAME = "stream (metalserve/loader.py:263)"
RAW = "".join(
    ";".join(stack) + f" {count}\n"
    for *stack, count in [
        (API, "thread (0x9): MainThread", "run (uvicorn/server.py:70)", 50),
        (
            ENGINE,
            LOAD,
            LOAD_VERSION.format(280),
            "_prepare (metalserve/loader.py:461)",
            "<module> (transformers/__init__.py:12)",
            120,
        ),
        (ENGINE, LOAD, LOAD_VERSION.format(284), "result (concurrent/futures/_base.py:451)", 30),
        (
            ENGINE,
            STREAM,
            STREAM_FRAME,
            "load_weights (metalserve/weights.py:800)",
            "_read (metalserve/weights.py:560)",
            200,
        ),
        (ENGINE, STREAM, STREAM_FRAME, "load_weights (metalserve/weights.py:801)", 40),
    ]
)
WEIGHTS = "thread (0x2): metalserve-weights  load_weights (metalserve/weights.py)"


def report(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    raw = tmp_path / "prof.txt"
    if not raw.exists():
        raw.write_text(RAW)
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(raw), *args], capture_output=True, text=True, check=False
    )


def test_one_process_by_thread_and_function(tmp_path: Path) -> None:
    out = report(tmp_path, "--process", "metalserve.core.process").stdout
    assert "    3.90 s  in all (390 samples at 100 Hz)" in out
    assert "    2.40 s  thread (0x2): metalserve-weights" in out
    assert "    1.50 s  thread (0x1): metalserve-load" in out
    assert "MainThread" not in out  # the API process's samples left out
    # Inclusive: both lines of load_weights (their line numbers dropped) count as one function.
    assert f"    2.40 s  {WEIGHTS}" in out
    assert f"    0.40 s  {WEIGHTS}" in out.split("self:")[1]


def test_under_a_frame_counts_from_it(tmp_path: Path) -> None:
    out = report(tmp_path, "--under", "_prepare", "--rate", "40").stdout
    assert "    3.00 s  in all (120 samples at 40 Hz)" in out
    assert "stream" not in out
    assert "result" not in out
    assert "load_version" not in out  # above the frame: not counted
    assert "_prepare (metalserve/loader.py)" in out


def test_a_line_that_is_no_stack_is_named(tmp_path: Path) -> None:
    (tmp_path / "prof.txt").write_text(RAW + "garbage\n")
    done = report(tmp_path)
    assert done.returncode == 2
    assert "line 6: not 'frame;frame;... COUNT'" in done.stderr
