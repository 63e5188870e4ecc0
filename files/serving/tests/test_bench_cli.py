"""The command line of ``metalserve load`` and ``metalserve bench ...`` (``metalserve.bench.cli``):
help without the benchmarks' dependencies, one line naming the ``bench`` extra when they are
missing, and the extra itself."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from conftest import run_cli
from metalserve.bench import cli as bench_cli
from metalserve.cli import main
from metalserve.exitcodes import ExitCode

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# Import name -> distribution name, for the modules the commands check.
DISTRIBUTIONS = {"prometheus_client": "prometheus-client"}


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        (("bench", "load"), ("--size-gib", "--manifest-format {1,2,3}", "--caches")),
        (("bench", "serve"), ("--preset {850m,8b,tiny}", "--server-args", "--clients")),
        (("bench", "reload-check"), ("--preset {160m,tiny}", "--out-dir", "--deadline")),
        (("bench", "decode-check"), ("--checks", "--preset {850m,8b,tiny}", "--dir")),
        (("load",), ("--cacert CACERT | --insecure", "--prompt TEXT", "METALSERVE_LOAD_API_KEY")),
    ],
)
def test_help(command: tuple[str, ...], flags: tuple[str, ...]) -> None:
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: metalserve {' '.join(command)} ")
    for flag in flags:
        assert flag in result.stdout


def test_bench_lists_its_benchmarks_and_checks() -> None:
    result = run_cli("bench", "--help")
    assert result.returncode == 0
    for name in ("load", "serve", "reload-check", "decode-check"):
        assert name in result.stdout
    missing = run_cli("bench")
    assert missing.returncode == 2
    assert "the following arguments are required: BENCHMARK" in missing.stderr


def test_help_needs_no_bench_dependency(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in bench_cli.BENCH_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # any import of them now fails
    with pytest.raises(SystemExit) as exited:
        main(["bench", "load", "--help"])
    assert exited.value.code == 0
    assert "--size-gib" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["bench", "load", "--device", "cpu"], "torch"),
        (["bench", "serve", "--device", "cpu"], "transformers"),
        (["bench", "reload-check", "--device", "cpu"], "torch"),
        (["bench", "decode-check", "--device", "cpu"], "prometheus_client"),
        (["load", "http://127.0.0.1:9", "--model", "m"], "httpx"),
    ],
)
def test_a_missing_dependency_exits_2_naming_the_extra(
    argv: list[str],
    module: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    assert main(argv) == ExitCode.USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    command = " ".join(argv[:2]) if argv[0] == "bench" else argv[0]
    assert lines[0].startswith(f"metalserve: error: metalserve {command} needs {module}")
    assert module in lines[0]
    assert "pip install 'metalserve[bench]'" in lines[0]


def test_the_bench_extra_lists_what_the_commands_check() -> None:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    names = {spec.split(">")[0].split("=")[0].split("<")[0].strip() for spec in extras["bench"]}
    assert names == {DISTRIBUTIONS.get(m, m) for m in bench_cli.BENCH_MODULES}
    assert set(bench_cli.LOAD_MODULES) <= set(bench_cli.BENCH_MODULES)
