"""The ``metalserve`` command. Heavy imports (torch, transformers) happen only where needed, so
``publish``, ``verify``, ``resolve`` and ``consistency`` start in well under a second.

Every command's flags come from its settings model (``metalserve.settings``, through
``metalserve.flags``). The load generator and the benchmarks (``load``, ``bench ...``) are
built by ``metalserve.bench.cli``, imported only when one of them runs: the product commands
never import ``metalserve.bench``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from metalserve import __version__, store
from metalserve.exitcodes import ExitCode
from metalserve.flags import add_command
from metalserve.logs import configure_logging
from metalserve.settings import (
    AutoscaleSettings,
    CacheFillSettings,
    ConsistencySettings,
    GcSettings,
    MakeTinyModelSettings,
    PublishSettings,
    ResolveSettings,
    ServeSettings,
    VerifySettings,
)

log = logging.getLogger("metalserve")

# The commands that metalserve.bench.cli builds, with their one-line help.
BENCH_COMMANDS = {
    "load": "bounded load against an OpenAI-compatible endpoint; exit 1 if any request failed",
    "bench": "benchmark our loader and server against their baselines (BENCHMARKS.md)",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    handler = args.handler
    try:
        return int(handler(args))
    except store.VerificationError as exc:
        error(str(exc))
        return ExitCode.VERIFICATION_FAILED
    except (store.VersionNotFoundError, store.AmbiguousVersionError) as exc:
        error(str(exc))
        return ExitCode.VERSION_NOT_FOUND
    except store.StoreError as exc:
        error(str(exc))
        return ExitCode.FAILURE


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The whole command line. ``load`` and ``bench`` get their flags (and metalserve.bench is
    imported) only when ``argv`` runs one of them; otherwise they are listed by name only."""
    parser = argparse.ArgumentParser(
        prog="metalserve", description="Model store tools and the model-replica server."
    )
    parser.add_argument("--version", action="version", version=f"metalserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_command(
        sub,
        "make-tiny-model",
        MakeTinyModelSettings,
        cmd_make_tiny_model,
        help="write a tiny random Llama model (HF layout)",
    )
    add_command(
        sub,
        "publish",
        PublishSettings,
        cmd_publish,
        help="publish a model directory as an immutable version",
    )
    add_command(
        sub, "verify", VerifySettings, cmd_verify, help="re-hash a version against its manifest"
    )
    add_command(
        sub,
        "resolve",
        ResolveSettings,
        cmd_resolve,
        help="print the full id of a version (prefix allowed)",
    )
    add_command(
        sub,
        "gc",
        GcSettings,
        cmd_gc,
        help="delete old versions of a model (dry run unless --delete)",
        description="Keeps the --keep-last newest versions and every --protect version; also "
        "removes staging dirs of publishes that died.",
    )
    add_command(
        sub,
        "cache-fill",
        CacheFillSettings,
        cmd_cache_fill,
        help="copy a version into a node's cache, verified (a rollout's prefetch)",
        description="Exits 6 when the version does not fit beside the versions in use or "
        "protected; the replicas then read the store.",
    )
    add_command(
        sub,
        "serve",
        ServeSettings,
        cmd_serve,
        help="run a model replica (OpenAI-compatible HTTP API)",
        description="Every flag can also be set as METALSERVE_<FLAG> in the environment.",
    )
    add_command(
        sub,
        "consistency",
        ConsistencySettings,
        cmd_consistency,
        help="check that replicas give identical greedy outputs",
    )
    add_command(
        sub,
        "autoscale",
        AutoscaleSettings,
        cmd_autoscale,
        help="promote and retire warm standbys in HAProxy from the replicas' load",
        description="Runs on a load balancer: reads the replicas' running and waiting requests "
        "from Prometheus, and sets the weight of servers configured with weight 0 through this "
        "HAProxy's admin socket. Never touches the servers the configuration puts in rotation.",
    )
    bench_parsers = {name: sub.add_parser(name, help=text) for name, text in BENCH_COMMANDS.items()}
    if _command(argv) in BENCH_COMMANDS:
        from metalserve.bench import cli as bench_cli

        bench_cli.configure_load(bench_parsers["load"])
        bench_cli.configure_bench(bench_parsers["bench"])
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named by ``argv``: its first argument that is not an option."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def cmd_make_tiny_model(settings: MakeTinyModelSettings) -> int:
    from metalserve.tiny_model import make_tiny_model

    quiet_transformers()
    for path in make_tiny_model(settings.out_dir, seed=settings.seed):
        print(path)
    return ExitCode.OK


def cmd_publish(settings: PublishSettings) -> int:
    existing = set(store.list_versions(settings.store, settings.model))
    version_id = store.publish(
        settings.src_dir, settings.store, settings.model, manifest_format=settings.manifest_format
    )
    # stderr tells people (and Ansible's changed_when) whether anything changed.
    state = "already published" if version_id in existing else "published"
    print(f"{state}: {settings.model} {version_id}", file=sys.stderr)
    print(version_id)  # last line of stdout: scripts and Ansible take it from there
    return ExitCode.OK


def cmd_verify(settings: VerifySettings) -> int:
    version_id = store.resolve_version(settings.store, settings.model, settings.version_ref)
    problems = store.verify_version(settings.store, settings.model, version_id)
    if problems:
        for problem in problems:
            print(f"FAIL {problem}", file=sys.stderr)
        error(
            f"version {version_id} of {settings.model} failed verification "
            f"({len(problems)} problems)"
        )
        return ExitCode.VERIFICATION_FAILED
    print(version_id)
    return ExitCode.OK


def cmd_resolve(settings: ResolveSettings) -> int:
    print(store.resolve_version(settings.store, settings.model, settings.version_ref))
    return ExitCode.OK


def cmd_gc(settings: GcSettings) -> int:
    from metalserve import retention

    chosen = retention.plan(
        settings.store, settings.model, keep_last=settings.keep_last, protected=settings.protect
    )
    if settings.delete:
        retention.apply(settings.store, chosen)
    print(retention.render(chosen, deleted=settings.delete))
    return ExitCode.OK


def cmd_cache_fill(settings: CacheFillSettings) -> int:
    import time

    from metalserve.cache import VersionCache

    version_id = store.resolve_version(settings.store, settings.model, settings.version)
    cache = VersionCache(settings.cache_dir, int(settings.max_gib * 2**30))
    if settings.protect:
        cache.set_protected([*settings.protect, version_id])
    lease = cache.acquire(settings.model, version_id)
    if lease is not None:
        lease.release()
        print(f"{version_id}: already cached")
        return ExitCode.OK
    started = time.monotonic()
    if not cache.add(settings.store, settings.model, version_id):
        error(
            f"{version_id[: store.SHORT_ID_LEN]} does not fit the cache beside the versions in "
            f"use or protected ({settings.max_gib:g} GiB): the replicas will read the store"
        )
        return ExitCode.NOT_CACHED
    print(f"{version_id}: cached in {time.monotonic() - started:.1f}s")
    return ExitCode.OK


def cmd_serve(settings: ServeSettings) -> int:
    configure_logging(settings.log_level, settings.log_format)
    # A replica never downloads anything: it serves verified files from the store only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Set through the environment: importing transformers here would delay opening the port.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    version_id = store.resolve_version(settings.store, settings.model, settings.version)
    from metalserve.core.spawn import spawn_engine_process

    # First, so that its imports run beside this process's (round 2 step 30).
    engine_process = (
        spawn_engine_process(settings.api_processes) if settings.uses_engine_process else None
    )
    from metalserve import server
    from metalserve.api import read_token

    try:
        read_token(settings.admin_token_file)
    except (OSError, ValueError) as exc:
        error(f"cannot use the admin token file: {exc}")
        if engine_process is not None:
            engine_process.abandon()
        return ExitCode.USAGE

    return server.run(settings, version_id, engine_process)


def cmd_consistency(settings: ConsistencySettings) -> int:
    from metalserve import consistency, tls

    prompts = (
        [settings.prompt] if settings.prompt else list(consistency.PROMPTS[: settings.prompts])
    )
    urls = settings.urls
    if settings.haproxy_socket is not None and settings.backend is not None:  # validated: both
        from metalserve.autoscale.haproxy import RuntimeAPI, RuntimeAPIError

        try:
            # The model's replicas on both sides of an A/B split (compared per version).
            servers = RuntimeAPI(settings.haproxy_socket).servers(settings.backend, variants=True)
        except RuntimeAPIError as exc:
            error(f"cannot read the replicas from HAProxy: {exc}")
            return ExitCode.FAILURE
        drained = [s.name for s in servers if s.drained]
        if drained:
            print(f"SKIPPED: {', '.join(drained)} drained or in maintenance (a change under way)")
            if settings.textfile is not None:
                consistency.write_skipped(settings.textfile, settings.model or "unknown")
            return ExitCode.OK
        # In rotation only: a warm standby (weight 0) is compared once promoted.
        rotation = [s for s in servers if s.healthy and s.weight > 0]
        urls = [f"{settings.scheme}://{s.address}:{s.port}" for s in rotation]
        if not urls:
            error(f"no replica of backend {settings.backend} is up and in rotation")
            return ExitCode.FAILURE
    report = consistency.check(
        urls,
        prompts,
        model=settings.model,
        max_tokens=settings.max_tokens or consistency.DEFAULT_MAX_TOKENS,
        timeout=settings.timeout,
        tolerance=settings.tolerance,
        per_version=settings.per_version,
        verify=tls.client_context(
            settings.tls_ca, settings.tls_client_cert, settings.tls_client_key
        ),
    )
    if len(prompts) == 1:
        print(consistency.render_table(report.answers[0]))
    else:
        print(consistency.render_summary(report))
    if settings.textfile is not None:
        model = settings.model or next(
            (r.model for answers in report.answers for r in answers if r.model), "unknown"
        )
        consistency.write_textfile(report, settings.textfile, model)
    ties = sum(r.ties for r in report.replicas)
    tie_note = f" ({ties} tolerated numerical ties)" if ties else ""
    if report.consistent:
        versions = len({r.version_id for r in report.replicas})
        scope = (
            f" (compared within each of {versions} versions)"
            if settings.per_version and versions > 1
            else ""
        )
        print(f"OK: {len(report.replicas)} replicas gave identical output{scope}{tie_note}")
        return ExitCode.OK
    failed = sum(r.errors > 0 for r in report.replicas)
    different = sum(r.different > 0 for r in report.replicas)
    print(
        f"INCONSISTENT: {report.differing_prompts} of {len(prompts)} prompts differ; "
        f"{different} replicas answered differently, {failed} failed replicas{tie_note}"
    )
    return ExitCode.FAILURE


def cmd_autoscale(settings: AutoscaleSettings) -> int:
    from metalserve.autoscale import controller

    configure_logging(settings.log_level)
    # httpx logs every request at info: one line per evaluation in the journal.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return controller.run(settings)


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def error(message: str) -> None:
    """One ``metalserve: error: ...`` line on stderr."""
    print(f"metalserve: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
