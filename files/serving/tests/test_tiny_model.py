from __future__ import annotations

import json
from pathlib import Path

from metalserve.engine import generate_once
from metalserve.loader import LoadedModel
from metalserve.sampling import SamplingParams
from metalserve.tiny_model import build_tokenizer, make_tiny_model

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def test_same_seed_same_bytes(tmp_path: Path, model_dirs: dict[int, Path]) -> None:
    make_tiny_model(tmp_path / "again", seed=1)
    for path in model_dirs[1].iterdir():
        assert (tmp_path / "again" / path.name).read_bytes() == path.read_bytes(), path.name


def test_layout_and_size(model_dirs: dict[int, Path]) -> None:
    directory = model_dirs[1]
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert sum(p.stat().st_size for p in directory.iterdir()) < 2 * 1024 * 1024
    assert (model_dirs[1] / "model.safetensors").read_bytes() != (
        model_dirs[2] / "model.safetensors"
    ).read_bytes()


def test_chat_template() -> None:
    tokenizer = build_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s><|user|>\nHi</s>\n<|assistant|>\n"


def test_greedy_text_is_varied_and_depends_on_the_seed(v1: LoadedModel, v2: LoadedModel) -> None:
    outputs = {}
    for name, bundle in (("v1", v1), ("v2", v2)):
        for prompt in ("The quick brown fox", "What is two plus two?"):
            ids = bundle.encode(prompt, add_special_tokens=True)
            outputs[name, prompt] = generate_once(bundle, ids, GREEDY)
            tokens = bundle.encode(outputs[name, prompt], add_special_tokens=False)
            assert len(set(tokens)) >= 8, f"degenerate output {outputs[name, prompt]!r}"
    assert outputs["v1", "The quick brown fox"] != outputs["v2", "The quick brown fox"]
    assert outputs["v1", "The quick brown fox"] != outputs["v1", "What is two plus two?"]
