from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import MODEL, Store, corrupt_weights
from metalserve import store
from metalserve.loader import LoadedModel, LoadError, load_version


def test_loads_a_verified_version(v1: LoadedModel, model_store: Store) -> None:
    assert v1.version_id == model_store.v1
    assert v1.device == torch.device("cpu")
    assert v1.dtype == torch.float32
    assert "model.safetensors" in v1.files
    assert v1.eos_token_ids == {v1.tokenizer.eos_token_id}
    assert v1.max_context == 512
    assert not v1.model.training


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
