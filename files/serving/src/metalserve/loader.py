"""Load one verified model version from the store onto a device.

Every file of the version is read eagerly in large sequential chunks (no mmap: over NFS that means
page faults at first use) and hashed while read; nothing is used before its hash matched the
manifest. Small files (config, tokenizer) are checked first (whole-file sha256, which format 2
manifests keep) and then materialized. Weight shards are streamed by ``metalserve.weights``: read
into a few reused (on CUDA pinned) host buffers, hashed block by block on a pool of threads
(format 2; format 1: whole files, one thread each) and copied straight into the model's
parameters, several shards at once, so host memory stays at a few buffers per shard in flight
whatever the model's size.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metalserve import store

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from metalserve.tensor_parallel import TensorParallel

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class LoadError(Exception):
    """The version cannot be served (unusable files, unknown architecture, missing device)."""


@dataclass(eq=False)
class LoadedModel:
    """A model version ready for inference; the engine runs one (two during a reload)."""

    name: str
    version_id: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    pad_token_id: int
    max_context: int
    vocab_size: int
    files: tuple[str, ...]
    load_seconds: float
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # (rank, world): the model holds that rank's part of each layer's projections only, and
    # runs only as the static path's share of a tensor-parallel replica.
    part_of: tuple[int, int] | None = None

    @property
    def short_id(self) -> str:
        return self.version_id[: store.SHORT_ID_LEN]

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Tokenize with the Rust backend directly: it is thread-safe and needs no lock."""
        ids: list[int] = self.tokenizer.backend_tokenizer.encode(
            text, add_special_tokens=add_special_tokens
        ).ids
        return ids


def validate_device(device: str) -> str:
    if not _DEVICE_RE.match(device):
        raise ValueError(f"device must be cpu, cuda or cuda:N, not {device!r}")
    return device


def import_libraries() -> None:
    """Import what a load needs (torch, transformers' auto classes) now: a cold start's first
    seconds, worth timing apart from the load itself."""
    import torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def load_version(
    store_path: Path,
    model_name: str,
    version_id: str,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    chunk_size: int = store.CHUNK_SIZE,
    tensor_parallel: TensorParallel | None = None,
) -> LoadedModel:
    """Verify and load ``version_id``; raise ``VerificationError`` naming any bad file.

    With ``tensor_parallel`` (a rank of more than one) only that rank's part of each layer's
    projections is read, verified and placed on the device (``metalserve.tensor_parallel``);
    the rest of the model whole."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.initialization import no_init_weights

    from metalserve import weights

    started = time.monotonic()
    torch_device = _torch_device(device)
    root = store.version_dir(store_path, model_name, version_id)
    if not root.is_dir():
        raise store.VersionNotFoundError(f"{root} does not exist")
    manifest = store.read_manifest(store_path, model_name, version_id)
    _check_file_set(root, manifest, version_id)

    shards = [e for e in manifest.files if e.path.endswith(".safetensors")]
    if not shards:
        raise LoadError(f"version {version_id[:12]} has no *.safetensors weights")
    others = [e for e in manifest.files if not e.path.endswith(".safetensors")]

    with tempfile.TemporaryDirectory(prefix="metalserve-") as tmp:
        # Small files (config, tokenizer) are verified, then materialized from the verified
        # bytes, so transformers never reads an unverified copy.
        for entry in others:
            data = _read_verified(root, entry, version_id, chunk_size)
            target = Path(tmp) / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        try:
            config = AutoConfig.from_pretrained(tmp, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise LoadError(f"cannot read config/tokenizer of {version_id[:12]}: {exc}") from exc
        generation_config = None
        if (Path(tmp) / "generation_config.json").is_file():
            generation_config = GenerationConfig.from_pretrained(tmp, local_files_only=True)

    if not getattr(tokenizer, "is_fast", False):
        raise LoadError("only fast (tokenizer.json) tokenizers are supported")
    torch_dtype = _resolve_dtype(dtype, config, torch_device)

    split = tensor_parallel is not None and tensor_parallel.world > 1
    # Build the module directly on the device, skipping the random init the weights replace;
    # a rank's part on the meta device first, its tensors then made at their parts' sizes.
    with no_init_weights(), torch.device("meta") if split else torch_device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval().requires_grad_(False)
    parts: dict[str, tuple[int, int, int]] = {}
    part_of = None
    if split:
        assert tensor_parallel is not None
        parts = _materialize_part(model, config, torch_device, tensor_parallel)
        part_of = (tensor_parallel.rank, tensor_parallel.world)

    params = model.state_dict(keep_vars=True)
    expected = set(params)

    def destination(spec: weights.TensorSpec) -> torch.Tensor | weights.Part | None:
        tensor: torch.Tensor | None = params.get(spec.name)
        if tensor is None or spec.name not in parts:
            return tensor
        return weights.Part(tensor, *parts[spec.name])

    try:
        loaded = set(
            weights.load_weights(
                root,
                shards,
                version_id,
                destination,
                device=torch_device,
                chunk_size=chunk_size,
            )
        )
    except weights.WeightsError as exc:
        raise LoadError(str(exc)) from exc
    # Checkpoints store tied weights (lm_head = embeddings) once; from_config does not tie.
    model.tie_weights()
    missing = _untied(expected - loaded, loaded, model)
    if missing:
        raise LoadError(f"weights missing from the safetensors files: {sorted(missing)[:5]}")

    eos = _eos_token_ids(config, generation_config, tokenizer)
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
        max_context=int(getattr(config, "max_position_embeddings", 0) or 2048),
        vocab_size=int(model.get_input_embeddings().num_embeddings),
        files=tuple(e.path for e in manifest.files),
        load_seconds=time.monotonic() - started,
        part_of=part_of,
    )
    log.info(
        "loaded %s version %s on %s (%s) in %.1fs",
        model_name,
        loaded_model.short_id,
        torch_device,
        str(torch_dtype).removeprefix("torch."),
        loaded_model.load_seconds,
    )
    return loaded_model


def _materialize_part(
    model: Any, config: Any, device: torch.device, tp: TensorParallel
) -> dict[str, tuple[int, int, int]]:
    """Give a model built on the meta device empty tensors on ``device``: each projection at
    its part's size for rank ``tp`` (tied tensors stay tied), every other tensor whole, the
    rotary embedding's angles recomputed. Returns each split tensor's ``(dim, start, stop)``."""
    import torch

    from metalserve import staticdecode, tensor_parallel

    reason = staticdecode.unsupported_reason(model) or tensor_parallel.unsupported_reason(
        int(config.num_attention_heads),
        int(config.num_key_value_heads),
        int(config.intermediate_size),
        tp.world,
    )
    if reason is not None:
        raise LoadError(f"tensor parallelism over {tp.world} ranks: {reason}")
    head_dim = staticdecode.config_head_dim(config)
    units = {
        "heads": int(config.num_attention_heads),
        "kv_heads": int(config.num_key_value_heads),
        "intermediate": int(config.intermediate_size),
    }
    per_unit = {"heads": head_dim, "kv_heads": head_dim, "intermediate": 1}
    parts: dict[str, tuple[int, int, int]] = {}
    made: dict[int, torch.nn.Parameter] = {}
    for prefix, module in model.named_modules():
        for attr, param in list(module._parameters.items()):
            if param is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            part = tensor_parallel.checkpoint_part(name, param.dim(), units, per_unit, tp)
            shape = list(param.shape)
            if part is not None:
                dim, start, stop = part
                shape[dim] = stop - start
                parts[name] = part
            if id(param) not in made:
                made[id(param)] = torch.nn.Parameter(
                    torch.empty(shape, dtype=param.dtype, device=device), requires_grad=False
                )
            module._parameters[attr] = made[id(param)]
    inner = model.model
    with device:
        inner.rotary_emb = type(inner.rotary_emb)(config=config)
    left = [name for name, b in model.named_buffers() if b.is_meta]
    if left:
        raise LoadError(f"cannot make {left[:3]} on {device} for a rank's part")
    return parts


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


def _resolve_dtype(dtype: str, config: Any, device: torch.device) -> torch.dtype:
    import torch

    if dtype not in DTYPES:
        raise LoadError(f"dtype must be one of {', '.join(DTYPES)}")
    if dtype != "auto":
        resolved: torch.dtype = getattr(torch, dtype)
        return resolved
    if device.type == "cpu":
        # Half precision matmuls on CPU are slow and numerically fragile.
        return torch.float32
    configured = getattr(config, "dtype", None)
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


def _untied(missing: set[str], loaded: set[str], model: PreTrainedModel) -> set[str]:
    """The missing names that do not share storage with a loaded tensor."""
    names_by_storage: dict[int, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_by_storage.setdefault(tensor.data_ptr(), set()).add(name)
    return {
        name
        for name in missing
        if not any(
            names_by_storage[ptr] & loaded
            for ptr, names in names_by_storage.items()
            if name in names
        )
    }


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
