from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import MODEL, Store, corrupt_weights
from metalserve import store
from metalserve.loader import LOAD_PARTS, LoadedModel, LoadError, load_version


def test_loads_a_verified_version(v1: LoadedModel, model_store: Store) -> None:
    assert v1.version_id == model_store.v1
    assert v1.device == torch.device("cpu")
    assert v1.dtype == torch.float32
    assert "model.safetensors" in v1.files
    assert v1.eos_token_ids == {v1.tokenizer.eos_token_id}
    assert v1.max_context == 512
    assert not v1.model.training
    # Each part timed, in order; those beside the weights' stream sum to less than the load.
    assert tuple(v1.load_parts) == LOAD_PARTS
    assert all(seconds > 0 for seconds in v1.load_parts.values())
    beside = ("transformers", "model", "tokenizer")
    assert (
        v1.load_parts["files"]
        + v1.load_parts["assign"]
        + max(v1.load_parts["weights"], sum(v1.load_parts[part] for part in beside))
        <= v1.load_seconds
    )


def test_weights_equal_transformers_from_pretrained(v1: LoadedModel, model_store: Store) -> None:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_store.sources[1]).eval()
    ids = torch.tensor([v1.encode("The quick brown fox", add_special_tokens=True)])
    with torch.no_grad():
        torch.testing.assert_close(v1.model(ids).logits, reference(ids).logits)


@pytest.fixture
def store_copy(tmp_path: Path, model_store: Store) -> Path:
    root = tmp_path / "store"
    shutil.copytree(model_store.root, root)
    return root


def test_tampered_weights_are_refused(store_copy: Path, model_store: Store) -> None:
    corrupt_weights(store.version_dir(store_copy, MODEL, model_store.v1) / "model.safetensors")
    with pytest.raises(store.VerificationError, match=r"model\.safetensors: blake3 [0-9a-f]{16}"):
        load_version(store_copy, MODEL, model_store.v1)


def test_tampered_tokenizer_and_extra_files_are_refused(
    store_copy: Path, model_store: Store
) -> None:
    vdir = store.version_dir(store_copy, MODEL, model_store.v1)
    (vdir / "stray.safetensors").write_bytes(b"x")
    with pytest.raises(store.VerificationError, match=r"stray\.safetensors: extra"):
        load_version(store_copy, MODEL, model_store.v1)
    (vdir / "stray.safetensors").unlink()
    (vdir / "tokenizer.json").chmod(0o644)
    (vdir / "tokenizer.json").write_text("{}")
    with pytest.raises(store.VerificationError, match=r"tokenizer\.json: size"):
        load_version(store_copy, MODEL, model_store.v1)


def test_unavailable_device_and_bad_dtype(model_store: Store) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(LoadError, match="CUDA is not available"):
            load_version(model_store.root, MODEL, model_store.v1, device="cuda:0")
    with pytest.raises(LoadError, match="dtype"):
        load_version(model_store.root, MODEL, model_store.v1, dtype="int4")


def test_bfloat16_and_tied_embeddings(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from metalserve.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    version_id = store.publish(tmp_path / "src", tmp_path / "store", "tied")

    loaded = load_version(tmp_path / "store", "tied", version_id, dtype="bfloat16")

    assert loaded.dtype == torch.bfloat16
    model = loaded.model
    assert (
        model.get_output_embeddings().weight.data_ptr()
        == model.get_input_embeddings().weight.data_ptr()
    )
    assert model.get_input_embeddings().weight.abs().sum() > 0


def _publish(
    tmp_path: Path, model: torch.nn.Module, name: str, edit: Callable[[Path], None] | None = None
) -> tuple[Path, str]:
    """Save ``model`` with the tiny tokenizer, let ``edit`` change the files, publish them."""
    from metalserve.tiny_model import build_tokenizer

    source = tmp_path / f"{name}-src"
    model.save_pretrained(source)  # type: ignore[operator]
    build_tokenizer().save_pretrained(source)
    if edit is not None:
        edit(source)
    return tmp_path / "store", store.publish(source, tmp_path / "store", name)


def _small(model_type: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from metalserve.tiny_model import build_tokenizer

    vocab = len(build_tokenizer())
    if model_type == "gpt2":
        sizes = {"n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 64}
    else:
        sizes = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 64,
        }
    config = AutoConfig.for_model(model_type, vocab_size=vocab, **sizes)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["gpt2", "gemma", "qwen3"])
def test_models_with_other_parameters_and_buffers_load_as_from_pretrained(
    tmp_path: Path, model_type: str
) -> None:
    """The model is built with its parameters on the meta device while the weights stream, and
    takes the loaded tensors after: GPT-2's Conv1D weights and learned positions, Gemma's
    embedding scale (a buffer no checkpoint holds), Qwen3's q/k norms, every rotary embedding's
    angles all end up as ``from_pretrained`` makes them."""
    from transformers import AutoModelForCausalLM

    root, version_id = _publish(tmp_path, _small(model_type), model_type)
    loaded = load_version(root, model_type, version_id)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / f"{model_type}-src").eval()
    ours = dict(loaded.model.named_buffers()) | dict(loaded.model.named_parameters())
    theirs = dict(reference.named_buffers()) | dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, msg=name)
    ids = torch.tensor([loaded.encode("The quick brown fox", add_special_tokens=True)])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits)


def _edit_weights(source: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from safetensors.torch import load_file, save_file

    path = source / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (
            lambda t: t.update(stray=torch.zeros(2)),
            r"unexpected tensors \['stray'\]",
        ),
        (
            lambda t: t.update({"model.norm.weight": torch.zeros(3)}),
            r"tensor 'model.norm.weight' has shape \[3\], the model expects \[32\]",
        ),
        (
            lambda t: t.pop("model.norm.weight"),
            r"weights missing from the safetensors files: \['model.norm.weight'\]",
        ),
    ],
    ids=["unexpected", "misshapen", "missing"],
)
def test_checkpoints_that_do_not_fit_the_model_are_refused_naming_the_tensor(
    tmp_path: Path, change: Callable[[dict[str, torch.Tensor]], None], error: str
) -> None:
    root, version_id = _publish(
        tmp_path, _small("llama"), "unfit", lambda source: _edit_weights(source, change)
    )
    with pytest.raises(LoadError, match=error):
        load_version(root, "unfit", version_id)


def test_a_config_transformers_cannot_read_is_refused_after_the_weights_verdict(
    tmp_path: Path,
) -> None:
    """transformers reads the config while the weights stream: its error is raised once the
    weights are through, and a tampered shard's verification error comes first."""

    def unknown_type(source: Path) -> None:
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps(config | {"model_type": "no-such"}))

    root, version_id = _publish(tmp_path, _small("llama"), "odd", unknown_type)
    with pytest.raises(LoadError, match=f"cannot read config/tokenizer of {version_id[:12]}"):
        load_version(root, "odd", version_id)
    corrupt_weights(store.version_dir(root, "odd", version_id) / "model.safetensors")
    with pytest.raises(store.VerificationError, match=r"model\.safetensors: blake3"):
        load_version(root, "odd", version_id)


def test_parameters_go_to_meta_only_in_the_thread_that_asked() -> None:
    """A hot reload builds its model while the engine serves: only the loading thread's new
    parameters are put on the meta device."""
    from metalserve.loader import _parameters_on_meta

    built: dict[str, torch.nn.Linear] = {}
    with _parameters_on_meta():
        built["here"] = torch.nn.Linear(2, 2)
        other = threading.Thread(target=lambda: built.update(there=torch.nn.Linear(2, 2)))
        other.start()
        other.join()
    after = torch.nn.Linear(2, 2)
    assert built["here"].weight.is_meta
    assert not built["there"].weight.is_meta
    assert not after.weight.is_meta


def test_a_tied_checkpoint_that_kept_the_lm_head_loads_tied_to_it(tmp_path: Path) -> None:
    """Tied weights are stored once, under either name: stored as ``lm_head.weight`` only, the
    embedding is tied to it (as ``from_pretrained`` does), not refused or left empty."""
    from transformers import AutoModelForCausalLM

    def lm_head_only(tensors: dict[str, torch.Tensor]) -> None:
        tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")

    source = _small("llama")
    source.config.tie_word_embeddings = True
    source.tie_weights()
    root, version_id = _publish(
        tmp_path, source, "head", lambda path: _edit_weights(path, lm_head_only)
    )
    loaded = load_version(root, "head", version_id).model
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "head-src").eval()
    embedding = loaded.get_input_embeddings().weight
    assert embedding.data_ptr() == loaded.get_output_embeddings().weight.data_ptr()
    torch.testing.assert_close(embedding, reference.get_input_embeddings().weight)


def test_a_failed_load_leaves_no_tensor_behind(tmp_path: Path) -> None:
    """A refused version's weights go with the failure, not at some later cyclic collection
    (the exception's traceback holds the loading frame): on a GPU a refused hot reload's
    weights would otherwise sit beside the served version's."""
    import gc

    def unknown_type(source: Path) -> None:
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps(config | {"model_type": "no-such"}))

    model = _small("llama")
    shape = tuple(model.get_input_embeddings().weight.shape)
    del model
    root, version_id = _publish(tmp_path, _small("llama"), "gone", unknown_type)
    gc.collect()
    gc.disable()  # only what reference counting frees counts
    try:
        with pytest.raises(LoadError) as failure:
            load_version(root, "gone", version_id)
        kinds = (torch.Tensor, torch.nn.Parameter)  # type(), not isinstance: no module proxies
        alive = [o for o in gc.get_objects() if type(o) in kinds and o.shape == shape]
        assert alive == [], failure.value
    finally:
        gc.enable()


def test_tensor_parallelism_refuses_an_unsupported_model_type_before_reading() -> None:
    from metalserve.loader import _parts_of
    from metalserve.tensor_parallel import TensorParallel

    with pytest.raises(LoadError, match="model type 'gpt2' is not one of"):
        _parts_of({"model_type": "gpt2", "num_attention_heads": 4}, TensorParallel(0, 2))
