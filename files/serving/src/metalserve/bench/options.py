"""The settings models of ``metalserve load`` and ``metalserve bench ...``: every flag of those
commands is a field here (``metalserve.flags`` turns the fields into argparse flags). Only the
standard library and pydantic are imported, so ``--help`` works without the ``bench`` extra."""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from metalserve.bench.common import (
    CACHES,
    DECODE_CHECKS,
    DEFAULT_SERVE_ARMS,
    LOAD_ARMS,
    RELOAD_CHECK_PRESETS,
    SERVE_ARMS,
    arms_type,
    positive_float,
    positive_int,
)
from metalserve.flags import Arg, CommandSettings
from metalserve.settings import (
    ManifestFormat,
    device_type,
    manifest_format_field,
)

LOAD_API_KEY_ENV = "METALSERVE_LOAD_API_KEY"
# Clearly different lengths (about 3, 12, 30 and 60 words), so that prefill differs per request.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "The quick brown fox",
    "Write one sentence about the sea, the wind and a small boat leaving the harbour.",
    "Summarise in plain words why a rolling update replaces the replicas of a service one at "
    "a time, and what a load balancer has to do so that no client notices that a replica is "
    "being drained, stopped and started again.",
    "You are reviewing the operations log of a small inference cluster. Each node runs one "
    "model replica per GPU behind a load balancer. During the night the model was updated to "
    "a new version, node by node. Explain which checks should pass before the next node is "
    "drained, which metrics would reveal failed client requests, and how to roll back safely.",
)
PROGRESS_INTERVAL_S = 10.0

PositiveInt = Annotated[int, Arg(type=positive_int)]
OptionalPositiveInt = Annotated[int | None, Arg(type=positive_int)]
Device = Annotated[str, Arg(type=device_type)]
DEVICE_HELP = "cuda, cuda:N or cpu"
OUT_HELP = "write the JSON report here"


class LoadSettings(CommandSettings):
    """``metalserve load``: what to send where, and when to stop.

    Value ranges are checked by :meth:`problems` (every problem at once, each naming its flag),
    not by pydantic, so that the run's own checks and the command line's are the same.
    """

    url: Annotated[str, Arg(positional=True, metavar="URL")] = Field(
        description="base URL, e.g. https://198.18.0.10"
    )  # requests go to URL/v1/completions
    api_key: Annotated[str | None, Arg(env=LOAD_API_KEY_ENV)] = Field(
        None, description=f"bearer token [{LOAD_API_KEY_ENV}]"
    )
    cacert: Annotated[Path | None, Arg(group="tls")] = Field(
        None, description="CA bundle to verify TLS with"
    )
    insecure: Annotated[bool, Arg(group="tls")] = Field(
        False, description="do not verify TLS certificates"
    )
    model: str | None = Field(None, description="model id (default: from /v1/models)")
    concurrency: int = Field(4, description="parallel workers (default: 4)")
    duration: float = Field(180.0, description="seconds (default: 180)")
    max_requests: int = Field(20000, description="(default: 20000)")
    max_tokens: int = Field(8, description="per request (default: 8)")
    stream_ratio: float = Field(0.5, description="fraction streamed (default: 0.5)")
    rate: float = Field(
        0.0, description="requests per second over all clients (default: 0, as fast as they can)"
    )
    prompts: Annotated[tuple[str, ...], Arg(flag="--prompt", append=True, metavar="TEXT")] = Field(
        DEFAULT_PROMPTS,
        description="prompt to send, repeatable (default: four built-in prompts of "
        "different lengths)",
    )
    timeout: float = Field(30.0, description="seconds per request")  # to the last byte
    headers: Annotated[
        tuple[str, ...], Arg(flag="--header", append=True, metavar="NAME: VALUE")
    ] = Field(
        (), description="HTTP header to send with every request, repeatable (e.g. a routing header)"
    )
    out: Path | None = Field(None, description="also write the JSON summary here")
    stop_file: Path | None = Field(None, description="stop once this file exists")
    progress_interval: Annotated[float, Arg(cli=False)] = PROGRESS_INTERVAL_S

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, value: str | None) -> str | None:
        """An empty --api-key falls back to the environment, as an absent one does."""
        return value or os.environ.get(LOAD_API_KEY_ENV) or None

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")

    def header_dict(self) -> dict[str, str]:
        """--header values (checked by :meth:`problems`) as a mapping, the API key's beside them."""
        sent = {name: value.strip() for name, _, value in (h.partition(":") for h in self.headers)}
        if self.api_key:
            sent["Authorization"] = f"Bearer {self.api_key}"
        return sent

    def problems(self) -> list[str]:
        """Every invalid setting, each message naming its flag; empty when all are valid."""
        problems = []
        if not self.url.startswith(("http://", "https://")):
            problems.append(f"URL must start with http:// or https:// (got {self.url!r})")
        if not 1 <= self.duration <= 3600:
            problems.append(f"--duration must be 1..3600 seconds (got {self.duration:g})")
        if not 1 <= self.concurrency <= 256:
            problems.append(f"--concurrency must be 1..256 (got {self.concurrency})")
        if not 0.0 <= self.stream_ratio <= 1.0:
            problems.append(f"--stream-ratio must be 0..1 (got {self.stream_ratio:g})")
        if not 0.0 <= self.rate <= 100_000:
            problems.append(f"--rate must be 0..100000 requests/s (got {self.rate:g})")
        if self.max_requests < 1:
            problems.append(f"--max-requests must be >= 1 (got {self.max_requests})")
        if self.max_tokens < 1:
            problems.append(f"--max-tokens must be >= 1 (got {self.max_tokens})")
        if not 0 < self.timeout <= 3600:
            problems.append(f"--timeout must be > 0 and <= 3600 seconds (got {self.timeout:g})")
        if not self.prompts or not all(self.prompts):
            problems.append("--prompt must not be empty")
        for header in self.headers:
            name, colon, _ = header.partition(":")
            if not colon or not name.strip() or name.strip() != name or not name.isascii():
                problems.append(f"--header must be 'NAME: VALUE' (got {header!r})")
        if self.cacert is not None and self.insecure:
            problems.append("--cacert and --insecure exclude each other")
        if self.cacert is not None and not self.cacert.is_file():
            problems.append(f"--cacert {self.cacert}: no such file")
        return problems


class BenchLoadSettings(CommandSettings):
    """``metalserve bench load``."""

    dir: Path = Field(
        Path("/var/tmp/metalserve-bench/load"),  # noqa: S108 - a disk, not tmpfs
        description="where the checkpoint is generated and kept; use a local disk, not tmpfs "
        "(default: %(default)s)",
    )
    size_gib: Annotated[float, Arg(type=positive_float)] = Field(
        8.0, gt=0, description="checkpoint size (default: 8)"
    )
    shards: PositiveInt = Field(4, ge=1, description="safetensors files (default: 4)")
    device: Device = Field("cuda", description=DEVICE_HELP)
    repeats: PositiveInt = Field(3, ge=1, description="runs per arm and cache (default: 3)")
    out: Path | None = Field(None, description=OUT_HELP)
    arms: Annotated[tuple[str, ...], Arg(type=arms_type(LOAD_ARMS))] = Field(
        LOAD_ARMS, description=f"comma-separated subset of {','.join(LOAD_ARMS)} (default: all)"
    )
    chunk_mib: PositiveInt = Field(16, ge=1, description="read size in MiB (default: 16)")
    range_mib: OptionalPositiveInt = Field(
        None,
        ge=1,
        description="stream a shard in ranges of this many MiB, several at once (default: the "
        "loader's, 128)",
    )
    workers: OptionalPositiveInt = Field(
        None,
        ge=1,
        description="readers (default: min(shards and ranges, cores / 2, 8) beside threads "
        "hashing blocks on the host; min(shards and ranges, cores, 16) when no core hashes: "
        "blocks hashed on the GPU, or ours_nohash)",
    )
    hash_threads: OptionalPositiveInt = Field(
        None,
        ge=1,
        description="threads hashing blocks while loading (default: cores - workers; "
        "also the <algorithm>_parallel arms' threads, default: cores)",
    )
    seed: int = Field(0, description="checkpoint contents")
    manifest_format: ManifestFormat = manifest_format_field(
        "another format than the checkpoint's under --dir regenerates it"
    )
    caches: Annotated[tuple[str, ...], Arg(type=arms_type(CACHES))] = Field(
        CACHES, description="comma-separated subset of cold,warm (default: both)"
    )

    @field_validator("arms")
    @classmethod
    def _arms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _subset(value, LOAD_ARMS)

    @field_validator("caches")
    @classmethod
    def _caches(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _subset(value, CACHES)


class BenchServeSettings(CommandSettings):
    """``metalserve bench serve``."""

    dir: Path = Field(
        Path("/var/tmp/metalserve-bench/serve"),  # noqa: S108 - our own dir
        description="where the model store is kept (default: %(default)s)",
    )
    preset: Literal["850m", "8b", "tiny"] = Field(
        "850m", description="model size (8b: Llama-3-8B's shape; tiny: tests)"
    )
    prompt_tokens: PositiveInt = Field(64, ge=1)
    shared_prefix_tokens: int = Field(
        0,
        ge=0,
        description="tokens every prompt starts with before its own prompt_tokens (the same "
        "seeded tokens for all: a shared system prompt, what the server's prefix cache reuses)",
    )
    new_tokens: PositiveInt = Field(128, ge=1)
    temperature: float = Field(
        0.0,
        ge=0.0,
        le=2.0,
        description="every arm's sampling temperature (default 0: greedy; the static arms then "
        "sample with transformers' own sampler)",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="every arm's top-p (with sampling)")
    clients: PositiveInt = Field(
        32, ge=1, description="concurrent HTTP clients, and the static batch size"
    )
    requests: OptionalPositiveInt = Field(
        None,
        ge=1,
        description="requests per arm (default: naive 4, static 2 batches, server 4 x clients)",
    )
    client_processes: PositiveInt = Field(
        4,
        ge=1,
        description="processes the server arm's clients are spread over, so that the load "
        "generator is not the bottleneck (default: %(default)s; 1: the bench's own process)",
    )
    device: Device = Field("cuda", description=DEVICE_HELP)
    out: Path | None = Field(None, description=OUT_HELP)
    arms: Annotated[tuple[str, ...], Arg(type=arms_type(SERVE_ARMS))] = Field(
        DEFAULT_SERVE_ARMS,
        description=f"comma-separated subset of {','.join(SERVE_ARMS)} (default: "
        f"{','.join(DEFAULT_SERVE_ARMS)}; server: the engine thread beside HTTP, "
        "--no-engine-process; server-fp8: that with --quantization fp8; server-process: the "
        "engine in a process of its own, --engine-process, the server's default on CUDA)",
    )
    seed: int = Field(0, description="weights and prompts")
    reload: bool = Field(
        False,
        description="after a server arm's timed run, hot-reload a second version of the same "
        "shape (other weights) through /admin/reload and time it to ready: what a rollout of "
        "strategy reload waits for per replica",
    )
    profile_passes: int = Field(
        0,
        ge=0,
        le=10_000,
        description="after a server arm's timed run, run it again with the engine's first N "
        "forward passes recorded by torch.profiler (/admin/profile; the trace under --dir, its "
        "summary in the report as engine_profile); the timed figures are from the run before "
        "(default: 0, none)",
    )
    server_args: tuple[str, ...] = Field(
        (),
        description="extra 'metalserve serve' flags for the server arm, e.g. '--decode-mode "
        "dynamic' (default: none, the server's defaults)",
    )

    @field_validator("arms")
    @classmethod
    def _arms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _subset(value, SERVE_ARMS)

    @property
    def prompt_length(self) -> int:
        """Tokens of every prompt: the shared prefix and its own."""
        return self.shared_prefix_tokens + self.prompt_tokens

    @field_validator("server_args", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        """The flag is one string, split like a shell would."""
        return shlex.split(value) if isinstance(value, str) else value

    def requests_for(self, arm: str) -> int:
        """Requests per arm: few for the slow naive arm, whole batches for the static one."""
        if arm == "naive":
            return self.requests or 4
        if arm == "static":
            wanted = self.requests or 2 * self.clients
            return math.ceil(wanted / self.clients) * self.clients
        return self.requests or 4 * self.clients


class ReloadCheckSettings(CommandSettings):
    """``metalserve bench reload-check``: hot reload and seeded sampling, two servers."""

    device: Device = Field("cuda", description=DEVICE_HELP)
    preset: Annotated[str, Arg(choices=RELOAD_CHECK_PRESETS)] = Field(
        "160m",
        description="model size of the two versions (160m: the GPU check; tiny: a CPU run)",
    )
    out_dir: Path | None = Field(
        None,
        description="where summary.json and the servers' logs go (default: a new directory "
        "under the temporary directory)",
    )
    deadline: Annotated[float, Arg(type=positive_float)] = Field(
        330.0, gt=0, description="seconds the whole check may take (default: 330)"
    )
    ready_timeout: Annotated[float, Arg(type=positive_float)] = Field(
        150.0, gt=0, description="seconds a server may take to get ready (default: 150)"
    )

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str) -> str:
        if value not in RELOAD_CHECK_PRESETS:
            raise ValueError(f"choose from {', '.join(RELOAD_CHECK_PRESETS)}")
        return value


class DecodeCheckSettings(CommandSettings):
    """``metalserve bench decode-check``: the static/CUDA-graph decode path on the bench serve
    model, against transformers (``verify``) and timed (``prof``)."""

    dir: Path = Field(
        Path("/var/tmp/metalserve-bench/serve"),  # noqa: S108 - our own dir
        description="bench serve's directory; its model is reused, or made there "
        "(default: %(default)s)",
    )
    preset: Literal["850m", "8b", "tiny"] = Field(
        "850m", description="model size (8b: Llama-3-8B's shape; tiny: tests)"
    )
    seed: int = Field(0, description="weights (as bench serve's --seed)")
    device: Device = Field("cuda", description=DEVICE_HELP)
    checks: Annotated[tuple[str, ...], Arg(type=arms_type(DECODE_CHECKS))] = Field(
        DECODE_CHECKS,
        description=f"comma-separated subset of {','.join(DECODE_CHECKS)}: correctness "
        "against transformers, step and prefill timings, FP8 weights against bfloat16 "
        "(default: all)",
    )
    out: Path | None = Field(None, description=OUT_HELP)

    @field_validator("checks")
    @classmethod
    def _checks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _subset(value, DECODE_CHECKS)


def _subset(value: tuple[str, ...], choices: tuple[str, ...]) -> tuple[str, ...]:
    """Set in code (not only by the flag): the same check as the flag's type."""
    unknown = [v for v in value if v not in choices]
    if unknown or not value:
        given = ", ".join(map(repr, unknown)) or "none"
        raise ValueError(f"unknown {given}; choose from {', '.join(choices)}")
    return tuple(c for c in choices if c in value)
