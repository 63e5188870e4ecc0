"""The ``metalserve`` command. Heavy imports (torch, transformers) happen only where needed, so
``publish``, ``verify``, ``resolve`` and ``consistency`` start in well under a second."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metalserve import __version__, store
from metalserve.exitcodes import ExitCode

log = logging.getLogger("metalserve")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = args.handler
    try:
        return int(handler(args))
    except store.VerificationError as exc:
        _error(str(exc))
        return ExitCode.VERIFICATION_FAILED
    except (store.VersionNotFoundError, store.AmbiguousVersionError) as exc:
        _error(str(exc))
        return ExitCode.VERSION_NOT_FOUND
    except store.StoreError as exc:
        _error(str(exc))
        return ExitCode.FAILURE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metalserve", description="Model store tools and the model-replica server."
    )
    parser.add_argument("--version", action="version", version=f"metalserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random Llama model (HF layout)")
    tiny.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (default: 0)")
    tiny.set_defaults(handler=cmd_make_tiny_model)

    publish = sub.add_parser("publish", help="publish a model directory as an immutable version")
    publish.add_argument("src_dir", type=Path, metavar="SRC_DIR")
    _store_arguments(publish)
    _manifest_format_argument(
        publish, "older formats are readable by older metalserve releases (and keep their ids)"
    )
    publish.set_defaults(handler=cmd_publish)

    verify = sub.add_parser("verify", help="re-hash a version against its manifest")
    _store_arguments(verify)
    verify.add_argument(
        "--version",
        dest="version_ref",
        required=True,
        metavar="ID",
        help="version id or unique prefix (>= 12 hex digits)",
    )
    verify.set_defaults(handler=cmd_verify)

    resolve = sub.add_parser("resolve", help="print the full id of a version (prefix allowed)")
    _store_arguments(resolve)
    resolve.add_argument("--version", dest="version_ref", required=True, metavar="ID")
    resolve.set_defaults(handler=cmd_resolve)

    from metalserve.settings import add_serve_arguments

    serve = sub.add_parser(
        "serve",
        help="run a model replica (OpenAI-compatible HTTP API)",
        description="Every flag can also be set as METALSERVE_<FLAG> in the environment.",
    )
    add_serve_arguments(serve)
    serve.set_defaults(handler=cmd_serve)

    consistency = sub.add_parser(
        "consistency", help="check that replicas give identical greedy outputs"
    )
    consistency.add_argument("urls", nargs="+", metavar="URL", help="replica base URL")
    consistency.add_argument("--prompt", default=None, help="prompt to send")
    consistency.add_argument("--model", default=None, help="model id (default: from /version)")
    consistency.add_argument("--max-tokens", type=int, default=None)
    consistency.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    consistency.set_defaults(handler=cmd_consistency)

    load = sub.add_parser(
        "load",
        help="bounded load against an OpenAI-compatible endpoint; exit 1 if any request failed",
        description="Sends /v1/completions requests until --duration or --max-requests is "
        "reached (or SIGTERM/SIGINT, or --stop-file exists) and prints a JSON summary.",
    )
    load.add_argument("url", metavar="URL", help="base URL, e.g. https://198.18.0.10")
    load.add_argument("--api-key", default=None, help="bearer token [METALSERVE_LOAD_API_KEY]")
    tls = load.add_mutually_exclusive_group()
    tls.add_argument("--cacert", type=Path, default=None, help="CA bundle to verify TLS with")
    tls.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    load.add_argument("--model", default=None, help="model id (default: from /v1/models)")
    load.add_argument("--concurrency", type=int, default=4, help="parallel workers (default: 4)")
    load.add_argument("--duration", type=float, default=180.0, help="seconds (default: 180)")
    load.add_argument("--max-requests", type=int, default=20000, help="(default: 20000)")
    load.add_argument("--max-tokens", type=int, default=8, help="per request (default: 8)")
    load.add_argument(
        "--stream-ratio", type=float, default=0.5, help="fraction streamed (default: 0.5)"
    )
    load.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="requests per second over all clients (default: 0, as fast as they can)",
    )
    load.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        default=None,
        metavar="TEXT",
        help="prompt to send, repeatable (default: four built-in prompts of different lengths)",
    )
    load.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    load.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    load.add_argument("--stop-file", type=Path, default=None, help="stop once this file exists")
    load.set_defaults(handler=cmd_load)
    bench = sub.add_parser(
        "bench", help="benchmark our loader and server against their baselines (BENCHMARKS.md)"
    )
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    _bench_load_arguments(benchmarks)
    _bench_serve_arguments(benchmarks)
    return parser


def _bench_load_arguments(benchmarks: Any) -> None:
    from metalserve import bench_common as bc

    load = benchmarks.add_parser(
        "load",
        help="weight loading: raw read, safetensors load_file, ours (cold and warm), H2D",
        description="Generate (or reuse) a seeded bf16 checkpoint in a model store under --dir "
        "and time, cold and warm, a raw sequential read, safetensors.torch.load_file and our "
        "loader's weight path with and without hash verification; also pinned host-to-device "
        "bandwidth and SHA-256 and BLAKE3 speed on one core and on all cores. Prints a table "
        "and the JSON report.",
    )
    load.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp/metalserve-bench/load"),  # noqa: S108 - a disk, not tmpfs
        help="where the checkpoint is generated and kept; use a local disk, not tmpfs "
        "(default: %(default)s)",
    )
    load.add_argument(
        "--size-gib", type=bc.positive_float, default=8.0, help="checkpoint size (default: 8)"
    )
    load.add_argument(
        "--shards", type=bc.positive_int, default=4, help="safetensors files (default: 4)"
    )
    load.add_argument("--device", type=_device, default="cuda", help="cuda, cuda:N or cpu")
    load.add_argument(
        "--repeats", type=bc.positive_int, default=3, help="runs per arm and cache (default: 3)"
    )
    load.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    load.add_argument(
        "--arms",
        type=bc.arms_type(bc.LOAD_ARMS),
        default=bc.LOAD_ARMS,
        help=f"comma-separated subset of {','.join(bc.LOAD_ARMS)} (default: all)",
    )
    load.add_argument(
        "--chunk-mib", type=bc.positive_int, default=16, help="read size in MiB (default: 16)"
    )
    load.add_argument(
        "--workers",
        type=bc.positive_int,
        default=None,
        help="shards streamed at once (default: min(shards, cores / 2, 8))",
    )
    load.add_argument(
        "--hash-threads",
        type=bc.positive_int,
        default=None,
        help="threads hashing blocks while loading (default: cores - workers; "
        "also the <algorithm>_parallel arms' threads, default: cores)",
    )
    load.add_argument("--seed", type=int, default=0, help="checkpoint contents")
    _manifest_format_argument(
        load, "another format than the checkpoint's under --dir regenerates it"
    )
    load.add_argument(
        "--caches",
        type=bc.arms_type(("cold", "warm")),
        default=("cold", "warm"),
        help="comma-separated subset of cold,warm (default: both)",
    )
    load.set_defaults(handler=cmd_bench_load)


def _bench_serve_arguments(benchmarks: Any) -> None:
    from metalserve import bench_common as bc

    serve = benchmarks.add_parser(
        "serve",
        help="generation: naive generate, static-batch generate, our server over HTTP",
        description="Generate (or reuse) a Llama-shaped model with seeded random weights, then "
        "measure tokens/s, TTFT and request latency of transformers generate() one request at "
        "a time, generate() on static batches of --clients, and our server with --clients "
        "concurrent streaming HTTP clients. Prints a table and the JSON report.",
    )
    serve.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp/metalserve-bench/serve"),  # noqa: S108 - our own dir
        help="where the model store is kept (default: %(default)s)",
    )
    serve.add_argument(
        "--preset", choices=("850m", "tiny"), default="850m", help="model size (tiny: tests)"
    )
    serve.add_argument("--prompt-tokens", type=bc.positive_int, default=64)
    serve.add_argument("--new-tokens", type=bc.positive_int, default=128)
    serve.add_argument(
        "--clients",
        type=bc.positive_int,
        default=32,
        help="concurrent HTTP clients, and the static batch size",
    )
    serve.add_argument(
        "--requests",
        type=bc.positive_int,
        default=None,
        help="requests per arm (default: naive 4, static 2 batches, server 4 x clients)",
    )
    serve.add_argument("--device", type=_device, default="cuda", help="cuda, cuda:N or cpu")
    serve.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    serve.add_argument(
        "--arms",
        type=bc.arms_type(bc.SERVE_ARMS),
        default=bc.SERVE_ARMS,
        help=f"comma-separated subset of {','.join(bc.SERVE_ARMS)} (default: all)",
    )
    serve.add_argument("--seed", type=int, default=0, help="weights and prompts")
    serve.add_argument(
        "--server-args",
        default="",
        help="extra 'metalserve serve' flags for the server arm, e.g. '--decode-mode dynamic' "
        "(default: none, the server's defaults)",
    )
    serve.set_defaults(handler=cmd_bench_serve)


def _device(value: str) -> str:
    from metalserve.loader import validate_device

    try:
        return validate_device(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    store_default = os.environ.get("METALSERVE_STORE")
    model_default = os.environ.get("METALSERVE_MODEL")
    parser.add_argument(
        "--store",
        type=Path,
        default=store_default,
        required=not store_default,
        help="model store root [METALSERVE_STORE]",
    )
    parser.add_argument(
        "--model",
        default=model_default,
        required=not model_default,
        help="model name [METALSERVE_MODEL]",
    )


def _manifest_format_argument(parser: argparse.ArgumentParser, note: str) -> None:
    parser.add_argument(
        "--manifest-format",
        type=int,
        choices=store.MANIFEST_FORMATS,
        default=store.MANIFEST_FORMAT,
        help="3 (default): per-file sha256 and per-block blake3, verified on every core; "
        f"2: per-block sha256 instead; 1: per-file sha256 only; {note}",
    )


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from metalserve.tiny_model import make_tiny_model

    _quiet_transformers()
    for path in make_tiny_model(args.out_dir, seed=args.seed):
        print(path)
    return ExitCode.OK


def cmd_publish(args: argparse.Namespace) -> int:
    existing = set(store.list_versions(args.store, args.model))
    version_id = store.publish(
        args.src_dir, args.store, args.model, manifest_format=args.manifest_format
    )
    # stderr tells people (and Ansible's changed_when) whether anything changed.
    state = "already published" if version_id in existing else "published"
    print(f"{state}: {args.model} {version_id}", file=sys.stderr)
    print(version_id)  # last line of stdout: scripts and Ansible take it from there
    return ExitCode.OK


def cmd_verify(args: argparse.Namespace) -> int:
    version_id = store.resolve_version(args.store, args.model, args.version_ref)
    problems = store.verify_version(args.store, args.model, version_id)
    if problems:
        for problem in problems:
            print(f"FAIL {problem}", file=sys.stderr)
        _error(
            f"version {version_id} of {args.model} failed verification ({len(problems)} problems)"
        )
        return ExitCode.VERIFICATION_FAILED
    print(version_id)
    return ExitCode.OK


def cmd_resolve(args: argparse.Namespace) -> int:
    print(store.resolve_version(args.store, args.model, args.version_ref))
    return ExitCode.OK


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from metalserve.settings import settings_from_args

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        _error(f"invalid settings:\n{exc}")
        return ExitCode.USAGE
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # A replica never downloads anything: it serves verified files from the store only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Set through the environment: importing transformers here would delay opening the port.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    version_id = store.resolve_version(settings.store, settings.model, settings.version)
    from metalserve import server
    from metalserve.api import read_token

    try:
        read_token(settings.admin_token_file)
    except (OSError, ValueError) as exc:
        _error(f"cannot use the admin token file: {exc}")
        return ExitCode.USAGE

    return server.run(settings, version_id)


def cmd_consistency(args: argparse.Namespace) -> int:
    from metalserve import consistency

    consistent, answers = consistency.check(
        args.urls,
        args.prompt or consistency.DEFAULT_PROMPT,
        model=args.model,
        max_tokens=args.max_tokens or consistency.DEFAULT_MAX_TOKENS,
        timeout=args.timeout,
    )
    print(consistency.render_table(answers))
    if consistent:
        print(f"OK: {len(answers)} replicas gave identical output")
        return ExitCode.OK
    failed = sum(not a.ok for a in answers)
    print(
        f"INCONSISTENT: {len({a.text for a in answers if a.ok})} distinct outputs, "
        f"{failed} failed replicas"
    )
    return ExitCode.FAILURE


def cmd_load(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from metalserve import loadgen

    settings = loadgen.LoadSettings(
        url=args.url,
        api_key=args.api_key or os.environ.get("METALSERVE_LOAD_API_KEY") or None,
        cacert=args.cacert,
        insecure=args.insecure,
        model=args.model,
        concurrency=args.concurrency,
        duration=args.duration,
        max_requests=args.max_requests,
        max_tokens=args.max_tokens,
        stream_ratio=args.stream_ratio,
        rate=args.rate,
        prompts=tuple(args.prompts) if args.prompts else loadgen.DEFAULT_PROMPTS,
        timeout=args.timeout,
        stop_file=args.stop_file,
    )
    problems = settings.problems()
    if problems:
        for problem in problems:
            _error(problem)
        return ExitCode.USAGE
    try:
        summary = asyncio.run(loadgen.run_load(settings))
    except loadgen.LoadError as exc:
        _error(str(exc))
        return ExitCode.FAILURE
    except KeyboardInterrupt:  # a second SIGINT: no summary
        return 128 + 2
    text = json.dumps(summary, indent=2)
    print(text, flush=True)
    if args.out is not None:
        try:
            args.out.write_text(text + "\n")
        except OSError as exc:
            _error(f"cannot write --out: {exc}")
            return ExitCode.FAILURE
    return loadgen.exit_code(summary)


def cmd_bench_load(args: argparse.Namespace) -> int:
    if not _device_usable(args.device):
        return ExitCode.USAGE
    from metalserve import bench_common, bench_load

    _quiet_transformers()
    options = bench_load.LoadOptions(
        dir=args.dir,
        size_gib=args.size_gib,
        shards=args.shards,
        device=args.device,
        repeats=args.repeats,
        out=args.out,
        arms=args.arms,
        chunk_mib=args.chunk_mib,
        workers=args.workers,
        hash_threads=args.hash_threads,
        seed=args.seed,
        caches=args.caches,
        manifest_format=args.manifest_format,
    )
    report = bench_load.run(options)
    return _print_report(bench_load.render(report), bench_common.write_report(report, args.out))


def cmd_bench_serve(args: argparse.Namespace) -> int:
    if not _device_usable(args.device):
        return ExitCode.USAGE
    from metalserve import bench_common, bench_serve

    _quiet_transformers()
    options = bench_serve.ServeOptions(
        dir=args.dir,
        preset=args.preset,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        clients=args.clients,
        requests=args.requests,
        device=args.device,
        out=args.out,
        arms=args.arms,
        seed=args.seed,
        server_args=tuple(shlex.split(args.server_args)),
    )
    try:
        report = bench_serve.run(options)
    except bench_serve.BenchError as exc:
        _error(str(exc))
        return ExitCode.FAILURE
    return _print_report(bench_serve.render(report), bench_common.write_report(report, args.out))


def _device_usable(device: str) -> bool:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        _error(f"argument --device: {device} requested but CUDA is not available")
        return False
    return True


def _print_report(table: str, report_json: str) -> int:
    """The table for people, then the JSON report (the last thing on stdout)."""
    print(table)
    print(report_json, end="")
    return ExitCode.OK


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _error(message: str) -> None:
    print(f"metalserve: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
