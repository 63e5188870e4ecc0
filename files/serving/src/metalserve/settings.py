"""Typed settings of the ``metalserve`` commands (the benchmarks': ``metalserve.bench.options``).

One pydantic-settings model per command; ``metalserve.flags`` makes their command-line flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from metalserve import prefixcache, store
from metalserve.autoscale.policy import Policy
from metalserve.flags import Arg, CommandSettings
from metalserve.loader import validate_device
from metalserve.logs import LogFormat

ENV_PREFIX = "METALSERVE_"
DEFAULT_PORT = 8000
# Default --max-batch-size: a GPU step costs about the same for 1 or 64 rows (weights dominate).
CUDA_MAX_BATCH_SIZE = 64
CPU_MAX_BATCH_SIZE = 16
# The shortest --max-context: a prompt, the warm-up's, and a few tokens of output.
MIN_CONTEXT = 32


def env_name(field: str) -> str:
    """The environment variable of a ``ServeSettings`` field."""
    return f"{ENV_PREFIX}{field.upper()}"


# --- types shared by several commands -----------------------------------------------------


def device_type(value: str) -> str:
    """An argparse type: ``cpu``, ``cuda`` or ``cuda:N``."""
    try:
        return validate_device(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def manifest_format_field(note: str) -> Any:
    """The ``--manifest-format`` field (publish, bench load): the same help but its last note."""
    return Field(
        store.MANIFEST_FORMAT,
        description="3 (default): per-file sha256 and per-block blake3, verified on every core; "
        f"2: per-block sha256 instead; 1: per-file sha256 only; {note}",
    )


ManifestFormat = Annotated[int, Arg(choices=store.MANIFEST_FORMATS)]
StoreRoot = Annotated[Path, Arg(env="METALSERVE_STORE")]
ModelName = Annotated[str, Arg(env="METALSERVE_MODEL")]
STORE_HELP = "model store root [METALSERVE_STORE]"
MODEL_HELP = "model name [METALSERVE_MODEL]"


# --- metalserve serve -----------------------------------------------------------------------


class ServeSettings(BaseSettings):
    """``metalserve serve``: every field a flag and a METALSERVE_<FIELD> environment variable."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, protected_namespaces=()
    )

    store: Path = Field(description="model store root (the NFS mount point)")
    model: str = Field(description="model name in the store; also the API's model id")
    version: str = Field(description="version id to serve, full or a unique prefix (>= 12 hex)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="TCP port to listen on")
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="also serve the Prometheus metrics alone on this port of the same address, "
        "for a scraper that must reach nothing else (default: none; /metrics on the main port "
        "either way)",
    )
    request_timeout: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="seconds a client has to send a whole request, from the connection's opening "
        "or its previous response's end; then 408 (or, once the head is in, the connection "
        "closes)",
    )
    device: str = Field("cpu", description="torch device: cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weights dtype (auto: float32 on CPU, the checkpoint's half type on GPU)",
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description=f"most sequences per forward pass (default: {CUDA_MAX_BATCH_SIZE} on CUDA, "
        f"{CPU_MAX_BATCH_SIZE} on CPU)",
    )
    max_context: int | None = Field(
        None,
        ge=MIN_CONTEXT,
        le=2**22,
        description="most tokens (prompt and output) one sequence may hold, at most the "
        "model's own context (default: the model's, its max_position_embeddings); the static "
        "KV cache holds as many sequences of it as the device's memory allows: a lower one "
        "lets it hold more",
    )
    decode_mode: Literal["auto", "dynamic", "static", "cuda-graphs"] = Field(
        "auto",
        description="decode path: cuda-graphs (static KV cache, graph-replayed steps), static "
        "(static KV cache, eager), dynamic (transformers forward, growable cache); auto: "
        "cuda-graphs on CUDA, dynamic on CPU",
    )
    modeling: Literal["auto", "transformers"] = Field(
        "auto",
        description="whose modules run the model: auto builds a Llama-family model (llama, "
        "mistral, qwen2, qwen3) that runs on the static path with metalserve's own (no "
        "transformers modeling import: seconds off a start) and any other with transformers'; "
        "transformers: always transformers'",
    )
    decode_compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="compile the static path's decoder layer with torch.compile (the first "
        "start compiles, later ones reuse TORCHINDUCTOR_CACHE_DIR); uncompiled, its elementwise "
        "steps run metalserve's fused Triton kernels on CUDA (as fast a step, seconds off a "
        "start); auto: compiled with cuda-graphs only where Triton is missing",
    )
    decode_attention: Literal["auto", "bucketed"] = Field(
        "auto",
        description="the static path's decode attention: auto reads each row's keys and values "
        "up to the row's own length where the kernel runs (CUDA with Triton; one graph per batch "
        "size), bucketed up to the attention-length bucket (torch's attention, masked)",
    )
    decode_gemm: Literal["auto", "torch"] = Field(
        "auto",
        description="the static path's decode projections: auto times our kernel for few rows "
        "against cuBLAS per projection (and the LM head) on the device when the decode path is "
        "built (CUDA graphs, Triton, bfloat16 or float16 weights) and uses it where it is "
        "faster; torch: cuBLAS always",
    )
    decode_tuning_file: Path | None = Field(
        None,
        description="keep what decode_gemm auto timed in this JSON file and reuse it at the next "
        "start on the same kind of GPU with the same kernel and libraries (the systemd unit: "
        "its cache directory; tensor-parallel ranks share it); default: timed at every start",
    )
    prefix_cache_tokens: int = Field(
        prefixcache.DEFAULT_TOKENS,
        ge=0,
        description="the static path's prefix cache: keys and values of up to this many prompt "
        "tokens (whole blocks of 16) kept on the device, so that a prompt that starts as an "
        "earlier one did (a shared system prompt, a chat's turns so far) prefills only the rest; "
        "least recently used blocks go first; 0: off (also off where the device memory does not "
        "hold it beside the KV cache; with tensor_parallel > 1 every rank holds its part, or "
        "none where one rank lacks the memory)",
    )
    quantization: Literal["none", "fp8"] = Field(
        "none",
        description="weights of the static path's projections: none (the model's dtype) or fp8 "
        "(E4M3, one scale per output channel, quantized when the model goes live: half the "
        "bytes a decode step reads; CUDA compute capability 8.9+ with bfloat16, or the CPU)",
    )
    tensor_parallel: int = Field(
        1,
        ge=1,
        le=8,
        description="ranks of this replica: its model's layers split over that many processes "
        "(torch.distributed: NCCL over GPUs cuda:0..N-1 of CUDA_VISIBLE_DEVICES, gloo on the "
        "CPU), this one serving HTTP, each rank reading and verifying only its part of the "
        "weights (the static decode path, CUDA graphs and the compiled layer on CUDA; a hot "
        "reload reloads every rank)",
    )
    engine_process: bool | None = Field(
        None,
        description="run the model and the generation engine in a process of their own, the "
        "HTTP side (parsing, tokenizing, streaming) in this one, so that the two do not take "
        "turns at one interpreter lock (as vLLM's engine core; one rank only for now); unset: "
        "on with CUDA and one rank, off otherwise",
    )
    api_processes: int = Field(
        1,
        ge=1,
        le=32,
        description="API processes in front of the engine's process, sharing the port (as "
        "vLLM's --api-server-count): each parses, tokenizes and streams the inference requests "
        "the kernel hands it, the first also answers probes, /version, /metrics (the others' "
        "requests counted in) and the admin API; needs the engine in its own process, plain "
        "HTTP (no TLS) for now",
    )
    max_queue: int = Field(1024, ge=1, description="most waiting sequences; beyond that, 429")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="longest prompt accepted (default: model context - 1)"
    )
    max_new_tokens: int = Field(1024, ge=1, description="largest max_tokens a request may ask")
    default_max_tokens: int = Field(
        16, ge=1, description="max_tokens of /v1/completions requests that give none"
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest request body")
    drain_timeout: float = Field(
        30.0, ge=0, description="seconds in-flight requests get after SIGTERM before abort"
    )
    admin_token_file: Path | None = Field(
        None, description="file holding the bearer token of /admin/reload (unset: disabled)"
    )
    tls_certfile: Path | None = Field(
        None,
        description="serve the API port over HTTPS with this PEM certificate (chain), reloaded "
        "when the file is renewed; needs --tls-keyfile (default: plain HTTP)",
    )
    tls_keyfile: Path | None = Field(None, description="the certificate's PEM private key")
    tls_client_ca: Path | None = Field(
        None,
        description="mutual TLS: refuse every API client without a certificate issued by this "
        "PEM CA (the metrics port stays plain); needs --tls-certfile",
    )
    read_chunk_mib: int = Field(16, ge=1, le=1024, description="read size when loading weights")
    otlp_endpoint: str | None = Field(
        None,
        description="send OpenTelemetry spans of inference requests (queue, prefill, decode, "
        "relay; under the caller's traceparent) to this OTLP/HTTP collector, e.g. "
        "http://collector:4318 (default: none, tracing off)",
    )
    cache_dir: Path | None = Field(
        None,
        description="node-local cache of verified versions, shared by the host's replicas "
        "(default: none, every load reads the store)",
    )
    cache_max_gib: float = Field(
        100.0, gt=0, description="most the cache may hold; least recently used versions go first"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: LogFormat = Field(
        "text",
        description="log lines as text or one JSON object each (time, level, logger, message, "
        "request_id, an access line's method, path, status, duration_s, client)",
    )
    access_log: bool = Field(True, description="log every HTTP request")
    debug_step_delay: float = Field(
        0.0, ge=0, le=10, description="sleep per engine step: simulates a slow device (tests)"
    )
    profile_dir: Path | None = Field(
        None,
        description="enable POST /admin/profile, which records the engine's next forward passes "
        "with torch.profiler and writes the trace and a summary here (needs the admin token; "
        "default: disabled)",
    )
    fault_injection: bool = Field(
        False,
        description="enable POST /admin/fault/wedge-engine, which blocks the engine loop to prove "
        "the systemd watchdog (lab proofs only; needs the admin token)",
    )

    @property
    def batch_limit(self) -> int:
        """``max_batch_size``, or the device's default when it is not set."""
        if self.max_batch_size is not None:
            return self.max_batch_size
        return CUDA_MAX_BATCH_SIZE if self.device.startswith("cuda") else CPU_MAX_BATCH_SIZE

    @property
    def uses_engine_process(self) -> bool:
        """``engine_process``, or its default: on CUDA with one rank (BENCHMARKS.md, round 2
        step 23: TTFT p99 0.75-0.87x the engine thread's on an H200 at 850M and 8B, tokens/s
        0.93-1.09x); on the CPU the two processes would share the same few cores."""
        if self.engine_process is not None:
            return self.engine_process
        return self.device.startswith("cuda") and self.tensor_parallel == 1

    @field_validator("prefix_cache_tokens")
    @classmethod
    def _whole_blocks(cls, value: int) -> int:
        if 0 < value < prefixcache.BLOCK_TOKENS:
            raise ValueError(
                f"must be 0 (off) or at least one block of {prefixcache.BLOCK_TOKENS} tokens"
            )
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return validate_device(value)

    @model_validator(mode="after")
    def _quantization(self) -> ServeSettings:
        if self.quantization != "none":
            if self.decode_mode == "dynamic":
                raise ValueError(
                    f"quantization {self.quantization} runs on the static decode path: "
                    "decode_mode static, cuda-graphs or auto, not dynamic"
                )
            if self.device.startswith("cuda") and self.dtype in ("float32", "float16"):
                raise ValueError(
                    f"quantization {self.quantization} on CUDA needs dtype bfloat16 or auto, "
                    f"not {self.dtype}"
                )
        return self

    @model_validator(mode="after")
    def _tensor_parallel(self) -> ServeSettings:
        if self.tensor_parallel > 1:
            if self.device not in ("cpu", "cuda"):
                raise ValueError(
                    f"tensor_parallel {self.tensor_parallel} takes device cpu or cuda (rank N "
                    f"runs on cuda:N of CUDA_VISIBLE_DEVICES), not {self.device}"
                )
            if self.decode_mode == "dynamic":
                raise ValueError(
                    f"tensor_parallel {self.tensor_parallel} runs the static decode path: "
                    "decode_mode static, cuda-graphs or auto, not dynamic"
                )
            if self.decode_mode == "cuda-graphs" and self.device != "cuda":
                raise ValueError(
                    f"tensor_parallel {self.tensor_parallel} with decode_mode cuda-graphs "
                    "needs device cuda (NCCL collectives in the graphs)"
                )
            if self.engine_process is True:
                raise ValueError(
                    f"tensor_parallel {self.tensor_parallel} runs the engine in the API's "
                    "process: engine_process takes one rank for now"
                )
        return self

    @model_validator(mode="after")
    def _metrics_port(self) -> ServeSettings:
        if self.metrics_port == self.port:
            raise ValueError(f"metrics_port {self.metrics_port} is the port of the API too")
        return self

    @model_validator(mode="after")
    def _api_processes(self) -> ServeSettings:
        if self.api_processes > 1 and not self.uses_engine_process:
            raise ValueError(
                f"api_processes {self.api_processes} share one engine in a process of its "
                "own: engine_process must be on (the default with CUDA and one rank)"
            )
        return self

    @model_validator(mode="after")
    def _tls(self) -> ServeSettings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_certfile is None:
            raise ValueError("tls_client_ca needs tls_certfile and tls_keyfile (mutual TLS)")
        for name in ("tls_certfile", "tls_keyfile", "tls_client_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path}: no such file")
        return self

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        return value.strip().lower()


# --- the store and client commands ----------------------------------------------------------


class MakeTinyModelSettings(CommandSettings):
    """``metalserve make-tiny-model``."""

    out_dir: Annotated[Path, Arg(positional=True, metavar="OUT_DIR")]
    seed: int = Field(0, description="weights seed (default: 0)")


class PublishSettings(CommandSettings):
    """``metalserve publish``."""

    src_dir: Annotated[Path, Arg(positional=True, metavar="SRC_DIR")]
    store: StoreRoot = Field(description=STORE_HELP)
    model: ModelName = Field(description=MODEL_HELP)
    manifest_format: ManifestFormat = manifest_format_field(
        "older formats are readable by older metalserve releases (and keep their ids)"
    )


class VerifySettings(CommandSettings):
    """``metalserve verify``."""

    store: StoreRoot = Field(description=STORE_HELP)
    model: ModelName = Field(description=MODEL_HELP)
    version_ref: Annotated[str, Arg(flag="--version", metavar="ID")] = Field(
        description="version id or unique prefix (>= 12 hex digits)"
    )


class ResolveSettings(CommandSettings):
    """``metalserve resolve``."""

    store: StoreRoot = Field(description=STORE_HELP)
    model: ModelName = Field(description=MODEL_HELP)
    version_ref: Annotated[str, Arg(flag="--version", metavar="ID")]


class GcSettings(CommandSettings):
    """``metalserve gc``."""

    store: StoreRoot = Field(description=STORE_HELP)
    model: ModelName = Field(description=MODEL_HELP)
    keep_last: int = Field(
        3, ge=1, description="keep this many of the newest versions (default: %(default)s)"
    )
    protect: Annotated[list[str], Arg(append=True, metavar="ID")] = Field(
        default_factory=list,
        description="never delete this version (full id or unique prefix; repeatable): what "
        "hosts run, ran or roll to, and what inventories pin",
    )
    delete: bool = Field(False, description="delete (without it: a dry run that only prints)")


class CacheFillSettings(CommandSettings):
    """``metalserve cache-fill``."""

    store: StoreRoot = Field(description=STORE_HELP)
    model: ModelName = Field(description=MODEL_HELP)
    version: str = Field(description="version to cache: full id or unique prefix (>= 12 hex)")
    cache_dir: Path = Field(description="the node-local cache (the replicas' --cache-dir)")
    max_gib: float = Field(100.0, gt=0, description="the cache's bound (default: %(default)s)")
    protect: Annotated[list[str], Arg(append=True, metavar="ID")] = Field(
        default_factory=list,
        description="never evict this version (full id; repeatable): what the host runs, ran and "
        "rolls to. Replaces the cache's list of protected versions when given.",
    )


class ConsistencySettings(CommandSettings):
    """``metalserve consistency``."""

    urls: Annotated[list[str], Arg(positional=True, nargs="*", metavar="URL")] = Field(
        default_factory=list, description="replica base URL (or --haproxy-socket)"
    )
    haproxy_socket: Path | None = Field(
        None,
        description="check the servers of --backend (and of its A/B variants, <backend>:<variant>) "
        "that this HAProxy's runtime API reports up "
        "and in rotation (a standby at weight 0 once promoted); "
        "skip the check (exit 0, the textfile says so) while one is drained or in maintenance: a "
        "rollout, a maintenance or a scale-down is under way",
    )
    backend: str | None = Field(
        None, description="the model's backend: role metalserve's prefix and the model's name"
    )
    scheme: Literal["http", "https"] = Field(
        "http", description="of the replicas found through HAProxy (default: %(default)s)"
    )
    prompt: str | None = Field(None, description="prompt to send (instead of --prompts)")
    prompts: int = Field(
        1,
        ge=1,
        le=8,
        description="send the first K of the built-in prompts (default: %(default)s)",
    )
    tolerance: float = Field(
        0.25,
        ge=0,
        le=5,
        description="nats between the two best tokens under which replicas that part there are "
        "a numerical tie, not a difference (default: %(default)s)",
    )
    per_version: bool = Field(
        False,
        description="compare each replica only with the replicas reporting its version (the "
        "periodic check: a rollout or a split serves two versions by design, and "
        "MetalserveVersionSkew watches for how long)",
    )
    textfile: Path | None = Field(
        None,
        description="also write the result as Prometheus metrics to this file (node_exporter's "
        "textfile collector)",
    )
    model: str | None = Field(None, description="model id (default: from /version)")
    max_tokens: int | None = None
    timeout: float = Field(60.0, description="seconds per request")
    tls_ca: Path | None = Field(
        None, description="check https replicas' certificates against this PEM CA"
    )
    tls_client_cert: Path | None = Field(
        None, description="present this PEM certificate to replicas that require one (mTLS)"
    )
    tls_client_key: Path | None = Field(None, description="the client certificate's key")

    @model_validator(mode="after")
    def _client_tls(self) -> ConsistencySettings:
        if (self.tls_client_cert is None) != (self.tls_client_key is None):
            raise ValueError("tls_client_cert and tls_client_key go together")
        if bool(self.urls) == (self.haproxy_socket is not None):
            raise ValueError("give replica URLs or --haproxy-socket, one of the two")
        if self.haproxy_socket is not None and not self.backend:
            raise ValueError("--haproxy-socket needs --backend (one per model: metalserve_<model>)")
        return self


class AutoscaleSettings(CommandSettings):
    """``metalserve autoscale``."""

    prometheus_url: str = Field(
        description="Prometheus that scrapes the replicas, e.g. http://mon:9090"
    )
    haproxy_socket: Path = Field(
        Path("/run/haproxy/admin.sock"),
        description="this load balancer's admin socket (default: %(default)s)",
    )
    backend: str = Field(
        description="the model's backend (role metalserve's prefix and the model's name)"
    )
    scale_up_at: float = Field(
        48.0,
        gt=0,
        description="promote a standby when running + waiting requests per server in rotation "
        "stay above this (default: %(default)s: 3/4 of the CUDA batch limit of 64)",
    )
    scale_down_at: float = Field(
        16.0,
        ge=0,
        description="retire a promoted standby when they stay below this (default: %(default)s)",
    )
    up_after: int = Field(
        2, ge=1, description="consecutive evaluations above before promoting (default: %(default)s)"
    )
    down_after: int = Field(
        6, ge=1, description="consecutive evaluations below before retiring (default: %(default)s)"
    )
    cooldown: float = Field(
        60.0, ge=0, description="seconds after an action before the next (default: %(default)s)"
    )
    min_active: int = Field(
        1, ge=1, description="never fewer servers in rotation (default: %(default)s)"
    )
    max_active: int | None = Field(
        None, ge=1, description="never more servers in rotation (default: all of them)"
    )
    ttft_p99_up_at: float | None = Field(
        None,
        gt=0,
        description="also promote when the replicas' TTFT p99 over the last minute exceeds this "
        "many seconds (default: not a signal)",
    )
    weight: int = Field(
        100, ge=1, le=256, description="weight of a promoted standby (default: %(default)s)"
    )
    interval: float = Field(
        5.0, gt=0, description="seconds between evaluations (default: %(default)s)"
    )
    metrics_address: str = Field(
        "127.0.0.1", description="address of the controller's /metrics (default: %(default)s)"
    )
    metrics_port: int = Field(
        9106, ge=0, le=65535, description="port of its /metrics; 0: none (default: %(default)s)"
    )
    dry_run: bool = Field(False, description="log and count decisions, change no weight")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="log level (debug: every evaluation; default: %(default)s)"
    )
    max_evaluations: int = Field(
        0, ge=0, description="stop after this many evaluations (default: 0, until SIGTERM)"
    )

    @model_validator(mode="after")
    def _valid_policy(self) -> AutoscaleSettings:
        self.policy()  # its rules' errors (hysteresis, bounds) name the settings
        return self

    def policy(self) -> Policy:
        return Policy(
            scale_up_at=self.scale_up_at,
            scale_down_at=self.scale_down_at,
            up_after=self.up_after,
            down_after=self.down_after,
            cooldown_s=self.cooldown,
            min_active=self.min_active,
            max_active=self.max_active,
            ttft_p99_up_at=self.ttft_p99_up_at,
        )
