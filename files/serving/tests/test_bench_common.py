"""What the benchmarks, the checks and the load generator share (``metalserve.bench.common``):
the one percentile definition, flag types, the table and the report helpers."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metalserve.bench import common


def test_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert common.percentile(values, 50) == 50
    assert common.percentile(values, 99) == 99
    assert common.percentile(values, 100) == 100
    assert common.percentile([3.0], 99) == 3.0
    assert common.percentile([1.0, 2.0], 50) == 1.0
    with pytest.raises(ValueError, match="no values"):
        common.percentile([], 50)


def test_percentile_sorts_its_input() -> None:
    assert common.percentile([30.0, 10.0, 20.0], 50) == 20.0
    assert common.percentile([30.0, 10.0, 20.0], 99) == 30.0
    assert common.percentile([30.0, 10.0, 20.0], 0) == 10.0


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=300))
def test_percentile_is_an_observed_value_and_ordered(values: list[float]) -> None:
    p50, p99 = common.percentile(values, 50), common.percentile(values, 99)
    assert p50 in values
    assert p99 in values
    assert min(values) <= p50 <= p99 <= max(values)
    # Nearest rank: at least p% of the values are <= the p-th percentile, and fewer are below.
    n = len(values)
    assert sum(v <= p99 for v in values) >= math.ceil(0.99 * n)
    assert sum(v < p99 for v in values) < max(1, math.ceil(0.99 * n))


def test_arms_type_keeps_the_choices_order() -> None:
    parse = common.arms_type(("a", "b", "c"))
    assert parse("c, a") == ("a", "c")
    for bad, message in (("a,x", "unknown arm 'x'"), (",", "unknown arm ','")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(bad)


@pytest.mark.parametrize(
    ("parse", "value", "message"),
    [
        (common.positive_int, "0", "0 must be at least 1"),
        (common.positive_int, "zero", "'zero' is not an integer"),
        (common.positive_float, "-1", "-1 must be a positive number"),
        (common.positive_float, "inf", "inf must be a positive number"),
        (common.positive_float, "x", "'x' is not a number"),
    ],
)
def test_positive_numbers(parse: object, value: str, message: str) -> None:
    assert callable(parse)
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse(value)


def test_positive_numbers_accept() -> None:
    assert common.positive_int("3") == 3
    assert common.positive_float("0.02") == 0.02


def test_render_table() -> None:
    table = common.render_table([["arm", "seconds"], ["raw", "1.5"], ["load_file", "2"]])
    assert table.splitlines() == [
        "arm        seconds",
        "---------  -------",
        "raw        1.5",
        "load_file  2",
    ]


def test_ratio_and_target() -> None:
    assert common.ratio(3.0, 2.0) == 1.5
    assert common.ratio(None, 2.0) is None
    assert common.ratio(1.0, 0.0) is None
    assert common.target(2.1, ">=", 2.0) == {"value": 2.1, "target": ">= 2", "met": True}
    assert common.target(12.0, "<=", 10)["met"] is False
    assert common.target(None, ">=", 1.0)["met"] is None


def test_write_report_and_filesystem(tmp_path: Path) -> None:
    out = tmp_path / "deeper" / "report.json"
    text = common.write_report({"b": 1, "a": [1, 2]}, out)
    assert out.read_text() == text
    assert json.loads(text) == {"b": 1, "a": [1, 2]}
    assert list(json.loads(text)) == ["b", "a"]  # key order kept
    assert common.write_report({}, None) == "{}\n"
    fs = common.filesystem_of(tmp_path)
    assert set(fs) == {"mount", "type", "source"}
    assert str(tmp_path).startswith(fs["mount"])


def test_log_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    common.log("bench x", "hello")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "[bench x] hello\n"
