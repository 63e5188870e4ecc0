"""The command line of ``metalserve load`` and ``metalserve bench load|serve|reload-check|
decode-check``, filled into the parsers that ``metalserve.cli`` creates for ``load`` and
``bench`` when one of them runs.

Building the parsers imports only the settings models (``options``), so ``--help`` always
works. Before a command imports anything else of this package, it checks that its dependencies
(the ``bench`` extra) are importable; if one is not, it exits 2 with one line naming the extra.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from metalserve.bench.options import (
    BenchLoadSettings,
    BenchServeSettings,
    DecodeCheckSettings,
    LoadSettings,
    ReloadCheckSettings,
)
from metalserve.cli import error, quiet_transformers
from metalserve.exitcodes import ExitCode
from metalserve.flags import add_command, configure_command

EXTRA = "bench"
INSTALL_HINT = f"pip install 'metalserve[{EXTRA}]'"
# What the commands import beyond the store commands' needs: pyproject.toml's `bench` extra.
LOAD_MODULES = ("httpx",)
BENCH_MODULES = ("httpx", "torch", "transformers", "safetensors", "tokenizers", "prometheus_client")


def missing_dependency(command: str, modules: tuple[str, ...]) -> str | None:
    """The one-line error for the first of ``modules`` that cannot be imported, else None."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            return (
                f"metalserve {command} needs {name}, which cannot be imported ({exc}); "
                f"install the {EXTRA} extra: {INSTALL_HINT}"
            )
    return None


def _usable(command: str, modules: tuple[str, ...], device: str | None = None) -> bool:
    """Whether ``command`` can run: its dependencies import and its device exists (else one
    error line; the caller exits 2)."""
    problem = missing_dependency(command, modules)
    if problem is None and device is not None and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            problem = f"argument --device: {device} requested but CUDA is not available"
    if problem is not None:
        error(problem)
        return False
    return True


# --- the parsers ----------------------------------------------------------------------------


def configure_load(parser: argparse.ArgumentParser) -> None:
    """``metalserve load``."""
    parser.description = (
        "Sends /v1/completions requests until --duration or --max-requests is reached (or "
        "SIGTERM/SIGINT, or --stop-file exists) and prints a JSON summary."
    )
    configure_command(parser, LoadSettings, cmd_load)


def configure_bench(parser: argparse.ArgumentParser) -> None:
    """``metalserve bench`` and its benchmarks and checks."""
    benchmarks: Any = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    add_command(
        benchmarks,
        "load",
        BenchLoadSettings,
        cmd_bench_load,
        help="weight loading: raw read, safetensors load_file, ours (cold and warm), H2D",
        description="Generate (or reuse) a seeded bf16 checkpoint in a model store under --dir "
        "and time, cold and warm, a raw sequential read, safetensors.torch.load_file and our "
        "loader's weight path with and without hash verification; also pinned host-to-device "
        "bandwidth and SHA-256 and BLAKE3 speed on one core and on all cores. Prints a table "
        "and the JSON report.",
    )
    add_command(
        benchmarks,
        "serve",
        BenchServeSettings,
        cmd_bench_serve,
        help="generation: naive generate, static-batch generate, our server over HTTP",
        description="Generate (or reuse) a Llama-shaped model with seeded random weights, then "
        "measure tokens/s, TTFT and request latency of transformers generate() one request at "
        "a time, generate() on static batches of --clients, and our server with --clients "
        "concurrent streaming HTTP clients. Prints a table and the JSON report.",
    )
    add_command(
        benchmarks,
        "reload-check",
        ReloadCheckSettings,
        cmd_reload_check,
        help="GPU check: hot reload under load and seeded sampling on the default decode path",
        description="Publish two seeded Llama-shaped versions into a temporary store, serve "
        "them with 'metalserve serve' on its defaults, reload between them under streaming "
        "load and check that no request failed, every response came from one version and "
        "outputs are deterministic; also seeded sampling. Prints the JSON summary (also "
        "--out-dir/summary.json); exit 1 if any check failed.",
    )
    add_command(
        benchmarks,
        "decode-check",
        DecodeCheckSettings,
        cmd_decode_check,
        help="GPU check: the static/CUDA-graph decode path against transformers, and its timings",
        description="On bench serve's model (reused from --dir, or made there): 'verify' "
        "compares the static/CUDA-graph decode path with transformers in float32 (greedy "
        "tokens) and bfloat16 (teacher-forced logits); 'prof' times decode steps (graph and "
        "eager), prefill and graph capture. Prints the JSON report (also --out).",
    )


# --- the commands ---------------------------------------------------------------------------


def cmd_load(settings: LoadSettings) -> int:
    if not _usable("load", LOAD_MODULES):
        return ExitCode.USAGE
    import asyncio
    import json

    from metalserve.bench import loadgen

    problems = settings.problems()
    if problems:
        for problem in problems:
            error(problem)
        return ExitCode.USAGE
    try:
        summary = asyncio.run(loadgen.run_load(settings))
    except loadgen.LoadError as exc:
        error(str(exc))
        return ExitCode.FAILURE
    except KeyboardInterrupt:  # a second SIGINT: no summary
        return 128 + 2
    text = json.dumps(summary, indent=2)
    print(text, flush=True)
    if settings.out is not None:
        try:
            settings.out.write_text(text + "\n")
        except OSError as exc:
            error(f"cannot write --out: {exc}")
            return ExitCode.FAILURE
    return loadgen.exit_code(summary)


def cmd_bench_load(settings: BenchLoadSettings) -> int:
    if not _usable("bench load", BENCH_MODULES, settings.device):
        return ExitCode.USAGE
    from metalserve.bench import common, load

    quiet_transformers()
    report = load.run(settings)
    return _print_report(load.render(report), common.write_report(report, settings.out))


def cmd_bench_serve(settings: BenchServeSettings) -> int:
    if not _usable("bench serve", BENCH_MODULES, settings.device):
        return ExitCode.USAGE
    from metalserve.bench import common, serve

    quiet_transformers()
    try:
        report = serve.run(settings)
    except serve.BenchError as exc:
        error(str(exc))
        return ExitCode.FAILURE
    return _print_report(serve.render(report), common.write_report(report, settings.out))


def cmd_reload_check(settings: ReloadCheckSettings) -> int:
    if not _usable("bench reload-check", BENCH_MODULES, settings.device):
        return ExitCode.USAGE
    from metalserve.bench import reload_check

    quiet_transformers()
    return reload_check.run(settings)


def cmd_decode_check(settings: DecodeCheckSettings) -> int:
    if not _usable("bench decode-check", BENCH_MODULES, settings.device):
        return ExitCode.USAGE
    from metalserve.bench import common, decode_check, serve

    quiet_transformers()
    try:
        report = decode_check.run(settings)
    except serve.BenchError as exc:
        error(str(exc))
        return ExitCode.FAILURE
    print(common.write_report(report, settings.out), end="")
    return ExitCode.OK


def _print_report(table: str, report_json: str) -> int:
    """The table for people, then the JSON report (the last thing on stdout)."""
    print(table)
    print(report_json, end="")
    return ExitCode.OK
