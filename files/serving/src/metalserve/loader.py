"""Load one verified model version from the store onto a device.

Every file of the version is read eagerly in large sequential chunks (no mmap: over NFS that means
page faults at first use) and hashed while read; nothing is used before its hash matched the
manifest. Small files (config, tokenizer) are checked first (whole-file sha256, which format 2
manifests keep) and then materialized. Weight shards are streamed by ``metalserve.weights``: read
into a few reused (on CUDA pinned) host buffers, hashed block by block on a pool of threads
(format 2; format 1: whole files, one thread each) and copied straight into tensors made on the
device from the shards' headers, several shards at once, so host memory stays at a few buffers per
shard in flight whatever the model's size. Meanwhile the tokenizer is read and the model built with
its parameters on the meta device; the loaded tensors then become its parameters. A model that will
run on the static path only (``static_only``) of the Llama family is built by
``metalserve.llama_family`` and its tokenizer read by ``metalserve.tokenization``, without
transformers where its files allow; any other by transformers (its import takes seconds of a
start: issue 17, item 4).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from metalserve import store, tokenization, triton_warmup
from metalserve.threads import DaemonExecutor
from metalserve.tokenization import IMPORTING_TRANSFORMERS, VersionTokenizer

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from metalserve.tensor_parallel import TensorParallel

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
_PATCHING = threading.Lock()
_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class LoadError(Exception):
    """The version cannot be served (unusable files, unknown architecture, missing device)."""


@dataclass(eq=False)
class ModelView:
    """What the API side needs of a served version: its names, tokenizer and limits, no weights.
    A ``LoadedModel`` is one; with the engine in a process of its own (``metalserve.core``) the
    API process holds only this, sent over from the engine's process."""

    name: str
    version_id: str
    tokenizer: VersionTokenizer
    # A view sent to another process (``view``) holds their names, so that process (the API's)
    # needs no torch to read it.
    device: torch.device | str
    dtype: torch.dtype | str
    eos_token_ids: frozenset[int]
    pad_token_id: int
    max_context: int
    vocab_size: int
    files: tuple[str, ...]
    load_seconds: float
    # The weights' stream alone (read, verified, on the device), which the rest of the load
    # (transformers' import, config, tokenizer, the model's modules) runs beside.
    weights_seconds: float = 0.0
    # The load's parts, by name (``LOAD_PARTS``): where a slow load's seconds went.
    load_parts: dict[str, float] = field(default_factory=dict)
    # Whose modules run the model: "metalserve" (``llama_family``, the static path only) or
    # "transformers".
    modeling: str = "transformers"
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def short_id(self) -> str:
        return self.version_id[: store.SHORT_ID_LEN]

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """A prompt's ids, by transformers' tokenizer (the API side's)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def view(self) -> ModelView:
        """This version's view alone (the same tokenizer; the device and dtype by name), to
        send to another process."""
        return ModelView(
            name=self.name,
            version_id=self.version_id,
            tokenizer=self.tokenizer,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            max_context=self.max_context,
            vocab_size=self.vocab_size,
            files=self.files,
            load_seconds=self.load_seconds,
            weights_seconds=self.weights_seconds,
            load_parts=self.load_parts,
            modeling=self.modeling,
            loaded_at=self.loaded_at,
        )


@dataclass(eq=False, kw_only=True)
class LoadedModel(ModelView):
    """A model version ready for inference; the engine runs one (two during a reload)."""

    device: torch.device
    dtype: torch.dtype
    model: PreTrainedModel
    # (rank, world): the model holds that rank's part of each layer's projections only, and
    # runs only as the static path's share of a tensor-parallel replica.
    part_of: tuple[int, int] | None = None

    @property
    def loaded_bytes(self) -> int:
        """Bytes the model's parameters and buffers hold now (released ones not): what a hot
        reload's next version of the same shape loads beside it."""
        tensors = (*self.model.parameters(), *self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)

    def use_transformers_modules(self) -> None:
        """Run this version with transformers' modules around its own tensors (no copy): the
        dynamic path of a model built for the static path alone (``llama_family``), where its
        static path cannot run (not one sequence of its context fits the device)."""
        if static_path_only(self.model):
            self.model = transformers_modules(self.model, self.dtype, self.device)
            self.modeling = "transformers"

    def release_weights(self) -> None:
        """Free the model's parameters and buffers (meta tensors from now on: the model cannot
        run again), for a model replaced for good, before its successor's static cache is
        sized to the memory left."""
        model: Any = self.model  # transformers types its ``to`` for dtypes and devices apart
        model.to("meta")


def static_path_only(model: Any) -> bool:
    """Whether ``model`` runs on the static decode path only (``llama_family``'s: it has no
    transformers forward for the dynamic path)."""
    return bool(getattr(model, "static_path_only", False))


def validate_device(device: str) -> str:
    if not _DEVICE_RE.match(device):
        raise ValueError(f"device must be cpu, cuda or cuda:N, not {device!r}")
    return device


def import_libraries() -> None:
    """Import torch now: a cold start's first seconds, worth timing apart from the load
    (transformers' import runs beside the weights' read, in ``load_version``); then begin
    Triton's set-up beside the rest of the start (``triton_warmup``)."""
    import torch  # noqa: F401

    triton_warmup.begin()


# A load's parts (``ModelView.load_parts``), in order: the manifest and the small files
# verified; then, while the weights stream (read, verified, on the device: ``weights``),
# transformers' import, the config and tokenizer read, the model's modules built; then the
# loaded tensors made the model's.
LOAD_PARTS = ("files", "transformers", "tokenizer", "model", "weights", "assign")


@dataclass
class _Prepared:
    """What ``load_version`` makes while the weights stream: all but the weights."""

    config: Any
    tokenizer: Any
    generation_config: Any
    model: Any
    seconds: dict[str, float]


def load_version(
    store_path: Path,
    model_name: str,
    version_id: str,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    chunk_size: int = store.CHUNK_SIZE,
    tensor_parallel: TensorParallel | None = None,
    max_context: int | None = None,
    static_only: bool = False,
) -> LoadedModel:
    """Verify and load ``version_id``; raise ``VerificationError`` naming any bad file.

    The weights stream (read, verified, copied to the device) into tensors made from their
    headers while this thread imports transformers, reads the config and tokenizer and builds
    the model with its parameters on the meta device; the loaded tensors then become its
    parameters. With ``tensor_parallel`` (a rank of more than one) only that rank's part of
    each layer's projections is read, verified and placed on the device
    (``metalserve.tensor_parallel``); the rest of the model whole. ``max_context``: sequences
    hold at most this many tokens where the model's context is longer. ``static_only``: the
    model will run on the static decode path only, so a Llama-family one is built without
    transformers' modeling code (``metalserve.llama_family``)."""
    import torch

    from metalserve import weights

    started = time.monotonic()
    torch_device = _torch_device(device)
    if dtype not in DTYPES:
        raise LoadError(f"dtype must be one of {', '.join(DTYPES)}")
    root = store.version_dir(store_path, model_name, version_id)
    if not root.is_dir():
        raise store.VersionNotFoundError(f"{root} does not exist")
    manifest = store.read_manifest(store_path, model_name, version_id)
    _check_file_set(root, manifest, version_id)

    shards = [e for e in manifest.files if e.path.endswith(".safetensors")]
    if not shards:
        raise LoadError(f"version {version_id[:12]} has no *.safetensors weights")
    others = [e for e in manifest.files if not e.path.endswith(".safetensors")]
    split = tensor_parallel is not None and tensor_parallel.world > 1

    tensors: dict[str, torch.Tensor] = {}
    parts: dict[str, tuple[int, int, int]] = {}
    prepared: _Prepared | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="metalserve-") as tmp:
            # Small files (config, tokenizer) are verified, then materialized from the verified
            # bytes, so transformers never reads an unverified copy.
            small: dict[str, bytes] = {}
            for entry in others:
                data = small[entry.path] = _read_verified(root, entry, version_id, chunk_size)
                target = Path(tmp) / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            raw_config = _raw_config(Path(tmp), version_id)
            files_seconds = time.monotonic() - started
            torch_dtype = _resolve_dtype(dtype, raw_config, torch_device)
            parts_of = _parts_of(raw_config, tensor_parallel) if tensor_parallel and split else None
            # The weights stream on another thread: the device this one means by "cuda", named,
            # and made current there (a rank on cuda:1 must not touch cuda:0: a context costs
            # memory).
            on = torch_device
            if on.type == "cuda" and on.index is None:
                on = torch.device("cuda", torch.cuda.current_device())

            def destination(spec: weights.TensorSpec) -> torch.Tensor | weights.Part:
                part = parts_of(spec.name, len(spec.shape)) if parts_of is not None else None
                shape = list(spec.shape)
                if part is not None:
                    shape[part[0]] = part[2] - part[1]
                    parts[spec.name] = part
                tensor = tensors[spec.name] = torch.empty(
                    shape, dtype=_kept_dtype(spec, torch_dtype), device=on
                )
                return weights.Part(tensor, *part) if part is not None else tensor

            def stream() -> float:
                """The weights' seconds: read, verified and on the device."""
                begun = time.monotonic()
                with torch.cuda.device(on) if on.type == "cuda" else nullcontext():
                    weights.load_weights(
                        root, shards, version_id, destination, device=on, chunk_size=chunk_size
                    )
                return time.monotonic() - begun

            with DaemonExecutor("metalserve-weights") as pool:
                streaming = pool.submit(stream)
                try:
                    prepared = _prepare(
                        Path(tmp),
                        small,
                        version_id,
                        torch_dtype,
                        raw_config,
                        static_only=static_only,
                        max_context=max_context,
                    )
                finally:
                    # The weights' outcome first: a tampered shard is the error to report.
                    try:
                        weights_seconds = streaming.result()
                    except weights.WeightsError as exc:
                        raise LoadError(str(exc)) from exc
                    finally:
                        del streaming  # its exception's frames would keep this one
        if tensor_parallel is not None and split:
            from metalserve import staticdecode

            reason = staticdecode.unsupported_reason(prepared.model)
            if reason is not None:
                raise LoadError(f"tensor parallelism over {tensor_parallel.world} ranks: {reason}")
        assigning = time.monotonic()
        _assign(prepared.model, tensors, parts, torch_device)
        assign_seconds = time.monotonic() - assigning
    except BaseException:
        # Nothing of a failed load outlives it (the exception's traceback holds this frame):
        # a refused hot reload's weights would otherwise stay on the device beside the served
        # version's until a cyclic collection.
        tensors.clear()
        prepared = None
        raise
    config, tokenizer, model = prepared.config, prepared.tokenizer, prepared.model
    part_of = (tensor_parallel.rank, tensor_parallel.world) if tensor_parallel and split else None

    eos = _eos_token_ids(config, prepared.generation_config, tokenizer)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = min(eos) if eos else 0
    loaded_model = LoadedModel(
        name=model_name,
        version_id=version_id,
        model=model,
        tokenizer=tokenizer,
        device=torch_device,
        dtype=torch_dtype,
        eos_token_ids=frozenset(eos),
        pad_token_id=int(pad),
        max_context=served_context(config, max_context),
        vocab_size=int(model.get_input_embeddings().num_embeddings),
        files=tuple(e.path for e in manifest.files),
        load_seconds=time.monotonic() - started,
        weights_seconds=weights_seconds,
        load_parts={
            "files": files_seconds,
            **prepared.seconds,
            "weights": weights_seconds,
            "assign": assign_seconds,
        },
        modeling="metalserve" if static_path_only(model) else "transformers",
        part_of=part_of,
    )
    log.info(
        "loaded %s version %s on %s (%s, %s modules) in %.1fs (%s)",
        model_name,
        loaded_model.short_id,
        torch_device,
        str(torch_dtype).removeprefix("torch."),
        loaded_model.modeling,
        loaded_model.load_seconds,
        ", ".join(f"{part} {seconds:.2f}s" for part, seconds in loaded_model.load_parts.items()),
    )
    return loaded_model


# Checkpoint tensors up to this many elements keep their own dtype until the model says which it
# wants: a parameter a model keeps in float32 (a router, a norm) is not rounded to the served
# dtype on the way. Larger ones are made in the served dtype at once (memory: a float32
# checkpoint served in bfloat16 would otherwise take twice its served size for a while).
KEEP_DTYPE_ELEMENTS = 1 << 20


def served_context(config: Any, max_context: int | None) -> int:
    """The most tokens a sequence of a model of ``config`` holds: its context, or
    ``max_context`` where that is less."""
    return min(int(getattr(config, "max_position_embeddings", 0) or 2048), max_context or 2**62)


def _kept_dtype(spec: Any, served: torch.dtype) -> torch.dtype:
    if not spec.dtype.is_floating_point or math.prod(spec.shape) <= KEEP_DTYPE_ELEMENTS:
        kept: torch.dtype = spec.dtype
        return kept
    return served


def import_transformers(model_type: Any = None) -> None:
    """Import what a load uses of transformers, and the modeling module of ``model_type`` (a
    config.json's) where transformers has one, one thread at a time (``IMPORTING_TRANSFORMERS``)."""
    with IMPORTING_TRANSFORMERS:
        import transformers.initialization  # noqa: F401
        from transformers import (  # noqa: F401
            AutoConfig,
            AutoModelForCausalLM,
            AutoTokenizer,
            PreTrainedTokenizerFast,
        )

        if isinstance(model_type, str) and model_type.isidentifier():
            # Named otherwise: from_config imports it.
            with suppress(ImportError):
                importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def _raw_config(folder: Path, version_id: str) -> dict[str, Any]:
    """``config.json`` as written: what the weights' dtype and parts need before transformers
    is imported."""
    try:
        raw = json.loads((folder / "config.json").read_bytes())
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot read config/tokenizer of {version_id[:12]}: {exc}") from exc
    if not isinstance(raw, dict):
        raise LoadError(f"cannot read config/tokenizer of {version_id[:12]}: not a JSON object")
    return raw


def _parts_of(
    raw_config: dict[str, Any], tp: TensorParallel
) -> Callable[[str, int], tuple[int, int, int] | None]:
    """Rank ``tp``'s part ``(dim, start, stop)`` of a checkpoint tensor, by its name and
    dimensions (None: whole); refuses a model whose layers do not split over the ranks."""
    from metalserve import staticdecode, tensor_parallel

    # What the built model's check will say, before anything is read (that one stays).
    model_type = raw_config.get("model_type")
    if model_type not in staticdecode.SUPPORTED_MODEL_TYPES:
        raise LoadError(
            f"tensor parallelism over {tp.world} ranks: model type {model_type!r} is not one of "
            f"{sorted(staticdecode.SUPPORTED_MODEL_TYPES)}"
        )
    try:
        heads = int(raw_config["num_attention_heads"])
        units = {
            "heads": heads,
            "kv_heads": int(raw_config.get("num_key_value_heads") or heads),
            "intermediate": int(raw_config["intermediate_size"]),
        }
        head_dim = staticdecode.config_head_dim(SimpleNamespace(**raw_config))
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as exc:
        raise LoadError(
            f"tensor parallelism over {tp.world} ranks: config.json lacks {exc}"
        ) from exc
    reason = tensor_parallel.unsupported_reason(
        units["heads"], units["kv_heads"], units["intermediate"], tp.world
    )
    if reason is not None:
        raise LoadError(f"tensor parallelism over {tp.world} ranks: {reason}")
    per_unit = {"heads": head_dim, "kv_heads": head_dim, "intermediate": 1}
    return lambda name, ndim: tensor_parallel.checkpoint_part(name, ndim, units, per_unit, tp)


def _prepare(
    folder: Path,
    small: dict[str, bytes],
    version_id: str,
    dtype: torch.dtype,
    raw: dict[str, Any],
    *,
    static_only: bool,
    max_context: int | None,
) -> _Prepared:
    """Read the config and tokenizer in ``folder`` (``small``: its files' verified bytes) and
    build the model with its parameters on the meta device (the loaded tensors replace them)
    and its buffers (rotary angles, scales) computed on the CPU (moved to the device with the
    weights): by ``llama_family`` where the model will run on the static path only and is of
    that family, else by transformers."""

    seconds: dict[str, float] = {}
    begun = time.monotonic()

    def lap(part: str) -> None:
        nonlocal begun
        now = time.monotonic()
        seconds[part], begun = now - begun, now

    family = _family_config(raw, max_context) if static_only else None
    if family is None:
        import_transformers(raw.get("model_type"))
    lap("transformers")
    config: Any = family
    try:
        if family is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        tokenizer = tokenization.read(small, raw.get("model_type"), family=family is not None)
    except (OSError, ValueError, KeyError) as exc:
        raise LoadError(f"cannot read config/tokenizer of {version_id[:12]}: {exc}") from exc
    generation_config = _generation_config(folder, version_id)
    lap("tokenizer")
    if family is not None:
        from metalserve import llama_family

        # RoPE other than the default imports transformers' RoPE functions.
        with IMPORTING_TRANSFORMERS:
            model = llama_family.build(family, dtype)
    else:
        model = _transformers_model(config, dtype)
    lap("model")
    return _Prepared(config, tokenizer, generation_config, model, seconds)


def _transformers_model(config: Any, dtype: torch.dtype) -> Any:
    """transformers' model of ``config``, its parameters on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights(), _parameters_on_meta(), torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def transformers_modules(model: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """transformers' model of a ``llama_family`` model's config.json, its parameters that
    model's tensors (the same names: no copy)."""
    import_transformers(model.config.model_type)
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[model.config.model_type].from_dict(dict(model.config.raw))
    built = _transformers_model(config, dtype)
    _assign(built, model.state_dict(), {}, device)
    return built


def _family_config(raw: dict[str, Any], max_context: int | None) -> Any:
    """``raw``'s ``llama_family`` config, or None where that family does not build it or the
    static path would not run it (a sliding window shorter than the context served: the
    engine serves that one on the dynamic path)."""
    from metalserve import llama_family, staticdecode

    try:
        config = llama_family.parse_config(raw)
    except llama_family.Unsupported as exc:
        log.info("the model is built by transformers: %s", exc)
        return None
    window = staticdecode.sliding_window(config)
    if window is not None and served_context(config, max_context) > window:
        log.info("the model is built by transformers: a sliding window of %d tokens", window)
        return None
    return config


def _generation_config(folder: Path, version_id: str) -> SimpleNamespace | None:
    """``generation_config.json``'s end-of-sequence ids, which are all a load reads of it."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise LoadError(f"cannot read generation_config.json of {version_id[:12]}: {exc}") from exc
    if not isinstance(raw, dict):
        raise LoadError(f"cannot read generation_config.json of {version_id[:12]}: not an object")
    return SimpleNamespace(eos_token_id=raw.get("eos_token_id"))


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules this thread builds inside keep their parameters on the meta device (each made,
    then given up at once: no memory held) and their buffers as built. accelerate's
    ``init_empty_weights(include_buffers=False)`` does the same; it is not a dependency here."""
    import torch

    with _PATCHING:  # one patch at a time: each restores what it replaced
        thread = threading.get_ident()
        register = torch.nn.Module.register_parameter

        def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
            register(module, name, param)
            if param is not None and not param.is_meta and threading.get_ident() == thread:
                meta = torch.nn.Parameter(param.to("meta"), requires_grad=False)
                module._parameters[name] = meta

        torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign, assignment]
        try:
            yield
        finally:
            torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def _assign(
    model: Any,
    tensors: dict[str, torch.Tensor],
    parts: dict[str, tuple[int, int, int]],
    device: torch.device,
) -> None:
    """Make the loaded ``tensors`` the parameters (and persistent buffers) of ``model``, built
    with its parameters on the meta device, and move its other buffers to ``device``; tied
    parameters stay tied. ``parts``: the names loaded as a rank's part ``(dim, start, stop)``.
    Raises ``LoadError`` naming unexpected, misshapen or missing tensors."""
    import torch

    unexpected = sorted(set(tensors) - set(model.state_dict(keep_vars=True)))
    if unexpected:
        raise LoadError(f"unexpected tensors {unexpected[:5]}")
    made: dict[int, torch.nn.Parameter] = {}
    for prefix, module in model.named_modules():
        for attr, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) in made:
                module._parameters[attr] = made[id(param)]
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            tensor = tensors.get(name)
            if tensor is None:
                continue  # tied below, or missing
            _check_shape(name, tensor, param.shape, parts.get(name))
            made[id(param)] = module._parameters[attr] = torch.nn.Parameter(
                tensor.to(param.dtype), requires_grad=False
            )
        for attr, buffer in list(module._buffers.items()):
            if buffer is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            if name in tensors:
                _check_shape(name, tensors[name], buffer.shape, None)
                module._buffers[attr] = tensors[name].to(buffer.dtype)
            else:
                module._buffers[attr] = buffer.to(device)
    # Checkpoints store tied weights (lm_head = embeddings) once, either of the two;
    # from_config does not tie. Told what is missing, transformers ties to the one present.
    absent = {name for name in model.state_dict(keep_vars=True) if name not in tensors}
    model.tie_weights(missing_keys=set(absent))  # a copy: transformers takes the tied out
    params = dict(model.named_parameters(remove_duplicate=False))
    # Parameters still on the meta device, and persistent buffers the checkpoint lacks.
    missing = sorted(name for name in absent if name not in params or params[name].is_meta)
    if missing:
        raise LoadError(f"weights missing from the safetensors files: {missing[:5]}")


def _check_shape(
    name: str, tensor: torch.Tensor, shape: Any, part: tuple[int, int, int] | None
) -> None:
    expected = list(shape)
    of_part = ""
    if part is not None:
        expected[part[0]] = part[2] - part[1]
        of_part = f" (its part of {list(shape)})"
    if list(tensor.shape) != expected:
        raise LoadError(
            f"tensor {name!r} has shape {list(tensor.shape)}, the model expects {expected}{of_part}"
        )


def _torch_device(device: str) -> torch.device:
    import torch

    validate_device(device)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LoadError(f"device {device} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LoadError(f"device {device} does not exist ({torch.cuda.device_count()} GPUs)")
    return dev


def _resolve_dtype(dtype: str, raw_config: dict[str, Any], device: torch.device) -> torch.dtype:
    import torch

    if dtype != "auto":
        resolved: torch.dtype = getattr(torch, dtype)
        return resolved
    if device.type == "cpu":
        # Half precision matmuls on CPU are slow and numerically fragile.
        return torch.float32
    # transformers 5 writes "dtype", earlier versions "torch_dtype".
    configured = raw_config.get("dtype") or raw_config.get("torch_dtype")
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    # Keep a float16 checkpoint in float16; everything else runs in bfloat16 on GPUs.
    half: torch.dtype = torch.float16 if configured == torch.float16 else torch.bfloat16
    return half


def _check_file_set(root: Path, manifest: store.Manifest, version_id: str) -> None:
    listed = {e.path for e in manifest.files}
    present = {p for p in store.iter_files(root) if p != store.MANIFEST_NAME}
    problems = [f"{p}: missing" for p in sorted(listed - present)]
    problems += [f"{p}: extra file, not in the manifest" for p in sorted(present - listed)]
    if problems:
        raise store.VerificationError(version_id, problems)


def _read_verified(root: Path, entry: store.FileEntry, version_id: str, chunk_size: int) -> bytes:
    data, digest = store.read_hashed(root / entry.path, chunk_size)
    problem = store.check_entry(entry, len(data), digest)
    if problem:
        raise store.VerificationError(version_id, [problem])
    return data


def _eos_token_ids(config: Any, generation_config: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (generation_config, config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
