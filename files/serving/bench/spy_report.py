"""Where a process's seconds went, from a py-spy profile: samples by thread, then the functions
that held them (inclusive and self), over the whole process or under one frame.

Record a replica's start on a GPU machine (py-spy travels as a wheel: ``.whl/tools``), e.g.:
``py-spy record --subprocesses --idle --threads --rate 100 --format raw -o prof.txt -- CMD``;
then ``python3 files/serving/bench/spy_report.py prof.txt --process metalserve.core.process
--under load_version``. Frames are matched by substring, without their line numbers; seconds
are samples divided by ``--rate``. Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

_LINE_NUMBER = re.compile(r":\d+\)$")


@dataclass
class Report:
    """Samples by thread, and by function: inclusive (the function anywhere on the stack) and
    self (the innermost frame)."""

    total: int = 0
    threads: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[tuple[str, str]] = field(default_factory=Counter)
    own: Counter[tuple[str, str]] = field(default_factory=Counter)


def stacks(lines: Iterable[str]) -> Iterator[tuple[list[str], int]]:
    """py-spy's raw format: ``frame;frame;... COUNT`` per line, outermost first."""
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            raise ValueError(f"line {number}: not 'frame;frame;... COUNT': {line[:120]!r}")
        yield stack.split(";"), int(count)


def summarize(lines: Iterable[str], process: str = "", under: str = "") -> Report:
    """The samples of processes whose frame names ``process`` (all, if empty), and of those,
    with ``under``, the stacks through a frame naming it, counted from its innermost one."""
    report = Report()
    for frames, count in stacks(lines):
        # With --subprocesses the first frame is "process PID:COMMAND"; with --threads the next
        # one names the thread.
        starts = [i for i, f in enumerate(frames) if f.startswith("process ")]
        if process and (not starts or process not in frames[starts[-1]]):
            continue
        rest = frames[starts[-1] + 1 :] if starts else frames
        if not rest:
            continue
        thread, calls = rest[0], [_LINE_NUMBER.sub(")", f) for f in rest[1:]]
        if under:
            marks = [i for i, f in enumerate(calls) if under in f]
            if not marks:
                continue
            calls = calls[marks[-1] :]
        report.total += count
        report.threads[thread] += count
        if calls:
            report.own[(thread, calls[-1])] += count
        for call in set(calls):
            report.inclusive[(thread, call)] += count
    return report


def render(report: Report, rate: float, top: int) -> str:
    def seconds(samples: int) -> str:
        return f"{samples / rate:8.2f} s"

    out = [f"{seconds(report.total)}  in all ({report.total} samples at {rate:g} Hz)", "threads:"]
    out += [f"{seconds(n)}  {t}" for t, n in report.threads.most_common()]
    for title, counts in (("inclusive:", report.inclusive), ("self:", report.own)):
        out.append(title)
        out += [f"{seconds(n)}  {t[:32]:32}  {f[:150]}" for (t, f), n in counts.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path, help="py-spy record --format raw's output")
    parser.add_argument("--process", default="", help="only processes whose command has this")
    parser.add_argument("--under", default="", help="only stacks through a frame with this")
    parser.add_argument("--rate", type=float, default=100.0, help="py-spy's --rate (Hz)")
    parser.add_argument("--top", type=int, default=40, help="functions listed per table")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.top < 1:
        parser.error("--rate must be above 0 and --top at least 1")
    try:
        with args.raw.open() as lines:
            report = summarize(lines, args.process, args.under)
    except (OSError, ValueError) as exc:
        parser.error(f"{args.raw}: {exc}")
    print(render(report, args.rate, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
