"""Typed settings of ``metalserve serve``: command-line flags over METALSERVE_* environment.

Every field is both a flag (``--max-batch-size``) and an environment variable
(``METALSERVE_MAX_BATCH_SIZE``); a flag given on the command line wins. The argparse flags are
generated from the fields, so the two can never drift apart.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from metalserve.loader import validate_device

ENV_PREFIX = "METALSERVE_"
DEFAULT_PORT = 8000
# Default --max-batch-size: a GPU step costs about the same for 1 or 64 rows (weights dominate).
CUDA_MAX_BATCH_SIZE = 64
CPU_MAX_BATCH_SIZE = 16


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, protected_namespaces=()
    )

    store: Path = Field(description="model store root (the NFS mount point)")
    model: str = Field(description="model name in the store; also the API's model id")
    version: str = Field(description="version id to serve, full or a unique prefix (>= 12 hex)")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="TCP port to listen on")
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
    decode_mode: Literal["auto", "dynamic", "static", "cuda-graphs"] = Field(
        "auto",
        description="decode path: cuda-graphs (static KV cache, graph-replayed steps), static "
        "(static KV cache, eager), dynamic (transformers forward, growable cache); auto: "
        "cuda-graphs on CUDA, dynamic on CPU",
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
    read_chunk_mib: int = Field(16, ge=1, le=1024, description="read size when loading weights")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    access_log: bool = Field(True, description="log every HTTP request")
    debug_step_delay: float = Field(
        0.0, ge=0, le=10, description="sleep per engine step: simulates a slow device (tests)"
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

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return validate_device(value)

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        return value.strip().lower()


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field; absent flags stay absent so the environment applies."""
    for name, info in ServeSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = "required" if info.is_required() else f"default: {info.default}"
        help_text = f"{info.description} [{env_name(name)}; {default}]"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if info.annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag, metavar=name.upper(), **kwargs)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    given = {k: v for k, v in vars(args).items() if k in ServeSettings.model_fields}
    return ServeSettings(**given)
