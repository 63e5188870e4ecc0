"""Llama-family models built without transformers' modeling code (``metalserve.llama_family``):
the same config, modules, rotary angles and logits as transformers' build, and a load, warm-up
and engine that keep them on the static path."""

from __future__ import annotations

import copy
import gc
import json
import logging
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from conftest import MODEL, Store
from engine_helpers import PROMPTS, alone, submit
from metalserve import llama_family, staticdecode, store, tokenization
from metalserve.engine import Engine, Finished, StaticBatch, generate_once
from metalserve.loader import LoadedModel, LoadError, load_version, static_path_only
from metalserve.sampling import SamplingParams

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 606,  # the tiny model's tokenizer
    "max_position_embeddings": 128,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
# config.json files as checkpoints write them: transformers 5's rope_parameters, earlier
# versions' rope_scaling and rope_theta, fields left to the defaults, biases, tied embeddings.
CONFIGS = {
    "llama-defaults": {"model_type": "llama"},
    "llama-llama3-rope-legacy": {
        "model_type": "llama",
        **SMALL,
        "rope_theta": 500000.0,
        "rope_scaling": LLAMA3_ROPE,
        "tie_word_embeddings": True,
    },
    "llama-biases": {"model_type": "llama", **SMALL, "attention_bias": True, "mlp_bias": True},
    "mistral": {"model_type": "mistral", **SMALL, "sliding_window": None},
    "mistral-defaults": {"model_type": "mistral"},
    "qwen2-linear-rope": {
        "model_type": "qwen2",
        **SMALL,
        "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
    },
    "qwen2-sliding": {
        "model_type": "qwen2",
        **SMALL,
        "use_sliding_window": True,
        "sliding_window": 64,
        "max_window_layers": 1,
    },
    "qwen3": {"model_type": "qwen3", **SMALL, "head_dim": 32, "tie_word_embeddings": True},
    "llama-llama3-rope-short": {
        "model_type": "llama",
        **SMALL,
        "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if not k.startswith("original")},
        "eos_token_id": None,
    },
    "qwen2-no-kv-heads": {"model_type": "qwen2", "num_attention_heads": 16, "hidden_size": 1024},
    "qwen3-bias-type": {
        "model_type": "qwen3",
        **SMALL,
        "attention_bias": True,
        "rope_scaling": {"type": "linear", "factor": 4.0},
    },
}
COMPARED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "sliding_window",
    "layer_types",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


# Configs compared as configs only (their modules would be a 7B's, or have no valid shapes).
CONFIG_ONLY = ("llama-defaults", "mistral-defaults", "qwen2-no-kv-heads")


def _theirs(raw: dict[str, Any]) -> Any:
    # A copy: transformers standardizes the nested RoPE dict in place.
    return transformers.CONFIG_MAPPING[raw["model_type"]].from_dict(copy.deepcopy(raw))


@pytest.mark.parametrize("raw", CONFIGS.values(), ids=CONFIGS.keys())
def test_the_config_and_modules_are_transformers(raw: dict[str, Any]) -> None:
    """Fields a config.json leaves out get transformers' defaults; the modules have its tensor
    names, shapes and norm epsilons, the attention its scaling; the rotary angles are its own,
    bit for bit."""
    ours, theirs = llama_family.parse_config(raw), _theirs(raw)
    for name in COMPARED:
        assert getattr(ours, name) == getattr(theirs, name, None), name
    assert ours.head_dim == staticdecode.config_head_dim(theirs)
    rope = {k: v for k, v in theirs.rope_parameters.items() if k != "type"}
    assert ours.rope_parameters == rope

    if any(raw is CONFIGS[name] for name in CONFIG_ONLY):
        return
    model = llama_family.build(ours, torch.bfloat16)
    reference = transformers.AutoModelForCausalLM.from_config(theirs)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())
    assert staticdecode.unsupported_reason(model) is None
    ours_layer, their_layer = model.model.layers[0], reference.model.layers[0]
    assert ours_layer.self_attn.scaling == their_layer.self_attn.scaling
    for norm in ("input_layernorm", "post_attention_layernorm"):
        eps = getattr(their_layer, norm).variance_epsilon
        assert getattr(ours_layer, norm).variance_epsilon == eps
    positions = torch.arange(ours.max_position_embeddings)[None]
    anchor = torch.zeros((), dtype=torch.bfloat16)
    for ours_angles, their_angles in zip(
        model.model.rotary_emb(anchor, positions),
        reference.model.rotary_emb(anchor, positions),
        strict=True,
    ):
        assert torch.equal(ours_angles, their_angles)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"model_type": "gpt2"}, "'gpt2' is not one of"),
        ({"model_type": "llama", "hidden_act": "gelu"}, "activation 'gelu'"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}}, "RoPE type 'yarn'"),
        ({"model_type": "llama", "partial_rotary_factor": 0.5}, "partial rotary"),
        (
            {"model_type": "llama", "rope_scaling": {"rope_type": "linear", "factor": 2, "x": 1}},
            "RoPE parameters ['x']",
        ),
        ({"model_type": "llama", "hidden_size": "wide"}, "config.json"),
        ({"model_type": "llama", "rope_scaling": {"rope_type": "linear"}}, "without ['factor']"),
    ],
)
def test_what_is_not_built_here_is_named(raw: dict[str, Any], reason: str) -> None:
    with pytest.raises(llama_family.Unsupported) as caught:
        llama_family.parse_config(raw)
    assert reason in str(caught.value)


def _publish_random(kind: str, tmp_path: Path, model_dirs: dict[int, Path]) -> tuple[Path, str]:
    """A random model of ``CONFIGS[kind]`` with the tiny model's tokenizer, published."""
    theirs = _theirs({**CONFIGS[kind], "initializer_range": 0.5})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = transformers.AutoModelForCausalLM.from_config(theirs)
    folder = tmp_path / kind
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((model_dirs[1] / name).read_bytes())
    root = tmp_path / "store"
    return root, store.publish(folder, root, kind)


@pytest.mark.parametrize(
    "kind", ["llama-llama3-rope-legacy", "qwen2-linear-rope", "qwen3-bias-type"]
)
@torch.inference_mode()
def test_a_static_only_load_decodes_as_transformers_does(
    kind: str, tmp_path: Path, model_dirs: dict[int, Path]
) -> None:
    """Each family's biases, query/key norms, RoPE and tied embeddings, loaded from the store
    into these modules: the static path's prefill and decode steps give the logits of
    transformers' forward of the same checkpoint."""
    root, version = _publish_random(kind, tmp_path, model_dirs)
    ours = load_version(root, kind, version, static_only=True)
    theirs = load_version(root, kind, version)
    assert (ours.modeling, theirs.modeling) == ("metalserve", "transformers")
    assert static_path_only(ours.model)
    assert not static_path_only(theirs.model)
    assert (ours.eos_token_ids, ours.pad_token_id) == (theirs.eos_token_ids, theirs.pad_token_id)
    assert ours.max_context == theirs.max_context
    decoder = staticdecode.StaticDecoder(
        ours.model,
        slots=2,
        max_length=ours.max_context,
        device=ours.device,
        dtype=ours.dtype,
        cuda_graphs=False,
        attention="bucketed",
    )
    sequence = ours.encode(PROMPTS[0], add_special_tokens=True)
    logits = decoder.prefill(torch.tensor([sequence]), torch.tensor([len(sequence)]), 0)[0]
    for step in range(4):
        reference = theirs.model(input_ids=torch.tensor([sequence])).logits[0, -1]
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
        token = int(logits.argmax())
        if step == 0:
            decoder.admit(0, torch.tensor([token]), torch.tensor([len(sequence)]))
        else:
            decoder.advance(1, torch.tensor([token]))
        sequence.append(token)
        logits = decoder.decode(1, len(sequence) - 1)[0]


def test_a_static_only_load_imports_no_transformers(model_store: Store) -> None:
    """The point of it: neither transformers (its modeling, its tokenizers: the tokenizer is
    read by the tokenizers library) nor torch.compile's machinery is imported by a load,
    warm-up and generation (a fresh interpreter, as an engine process's start)."""
    script = f"""
import sys
from pathlib import Path
from metalserve.engine import generate_once, warmup_prompt
from metalserve.loader import load_version
from metalserve.sampling import SamplingParams
root = Path({str(model_store.root)!r})
bundle = load_version(root, {MODEL!r}, {model_store.v1!r}, static_only=True)
params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
generate_once(bundle, warmup_prompt(bundle), params)
heavy = ("transformers", "torch._dynamo")
print(bundle.modeling, sorted(name for name in heavy if name in sys.modules))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split("\n")[-2] == "metalserve []", done.stdout + done.stderr


@pytest.fixture(scope="module")
def lean(model_store: Store) -> LoadedModel:
    return load_version(model_store.root, MODEL, model_store.v1, static_only=True)


def test_the_warm_up_and_the_engine_keep_it_on_the_static_path(
    lean: LoadedModel, v1: LoadedModel
) -> None:
    """Its warm-up runs a one-slot static cache, as greedy as transformers' forward; the
    engine's auto mode on the CPU (the dynamic path) gives it the static path."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompt = v1.encode(PROMPTS[1], add_special_tokens=True)
    assert generate_once(lean, prompt, params) == generate_once(v1, prompt, params)
    batch = Engine()._new_batch(lean)
    assert isinstance(batch, StaticBatch)
    assert not batch.decoder.cuda_graphs


def _first_capture_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first decoder made fails its capture (its graphs or its compiled layer, and the
    retry uncompiled); the next ones capture."""
    first: list[weakref.ref[staticdecode.StaticDecoder]] = []

    def broken(self: staticdecode.StaticDecoder, defer: bool = False) -> None:
        if not first:
            first.append(weakref.ref(self))
        if first[0]() is self:
            raise RuntimeError("no graphs today")

    monkeypatch.setattr(staticdecode.StaticDecoder, "capture_all", broken)


def test_a_failed_capture_costs_it_its_graphs_not_its_path(
    lean: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where its decode mode fails, the static path runs eager (it has no dynamic path)."""
    _first_capture_fails(monkeypatch)
    batch = Engine(decode_mode="static", decode_compile="on")._new_batch(lean)
    assert isinstance(batch, StaticBatch)
    assert not batch.decoder.compiled
    assert "no graphs today); trying the static path, eager" in caplog.text
    assert lean.modeling == "metalserve"


def test_a_fault_of_its_static_path_is_no_reason_for_transformers_modules(
    lean: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only where its static cache cannot hold a sequence (the device's size) does it fall
    back to transformers' modules; a static path that fails otherwise fails the load."""

    def broken(self: staticdecode.StaticDecoder, defer: bool = False) -> None:
        raise RuntimeError("no graphs today")

    monkeypatch.setattr(staticdecode.StaticDecoder, "capture_all", broken)
    with pytest.raises(LoadError, match=r"static decode path failed: .*no graphs today"):
        Engine(decode_mode="static", decode_compile="on")._new_batch(lean)
    assert lean.modeling == "metalserve"


def test_where_no_sequence_fits_the_static_cache_a_reload_runs_transformers_modules(
    model_store: Store, v2: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version whose static cache cannot hold one sequence of its context (a long context
    on a small device: found only at the switch, after the served version is released) runs
    transformers' modules around the same tensors on the dynamic path, as transformers' build
    of it would: the engine keeps serving, the same text as transformers' model."""
    first, second = (
        load_version(model_store.root, MODEL, version, static_only=True)
        for version in (model_store.v1, model_store.v2)
    )
    embedding = second.model.get_input_embeddings().weight
    eng = Engine(max_batch_size=4, decode_mode="static")
    eng.start()
    try:
        eng.swap(first).result(timeout=30)
        assert (eng.decode_path, eng.modeling) == ("static", "metalserve")
        monkeypatch.setattr(staticdecode, "free_device_bytes", lambda device: 1024)
        assert eng.warmup_seconds == 0  # a swap without a warm-up
        assert eng.swap(second).result(timeout=60) is first
        assert (eng.decode_path, eng.modeling) == ("dynamic", "transformers")
        assert eng.warmup_seconds > 0  # transformers' modules proven before they went live
        assert not static_path_only(second.model)
        assert second.model.get_input_embeddings().weight.data_ptr() == embedding.data_ptr()
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        _, sink = submit(eng, second, PROMPTS[2], params)
        assert isinstance(sink.wait(30), Finished)
        assert sink.text == alone(v2, PROMPTS[2], params)
    finally:
        eng.stop()


def test_a_sliding_window_shorter_than_the_context_is_transformers_model(
    tmp_path: Path, model_dirs: dict[int, Path]
) -> None:
    """The static path attends to the whole context: a window shorter than the context served
    is the dynamic path's, so transformers builds that model; within the window, these modules."""
    root, version = _publish_random("qwen2-sliding", tmp_path, model_dirs)
    assert load_version(root, "qwen2-sliding", version, static_only=True).modeling == "transformers"
    within = load_version(root, "qwen2-sliding", version, static_only=True, max_context=64)
    assert within.modeling == "metalserve"


def test_the_generation_config_is_read_for_its_end_ids(
    tmp_path: Path, model_dirs: dict[int, Path]
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    for source in model_dirs[1].iterdir():
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    root = tmp_path / "store"
    version = store.publish(folder, root, MODEL)
    assert load_version(root, MODEL, version, static_only=True).eos_token_ids == {2, 5}
    (folder / "generation_config.json").write_text("{not json")
    broken = store.publish(folder, root, MODEL)
    with pytest.raises(LoadError, match=r"generation_config\.json"):
        load_version(root, MODEL, broken, static_only=True)


def test_tied_embeddings_stay_apart_where_the_checkpoint_has_two_different_ones(
    model_dirs: dict[int, Path],
) -> None:
    """As transformers: a tied config's head is the embedding where the checkpoint has one of
    the two, or two equal ones; two different ones (a head trained apart) are both kept."""
    from metalserve.loader import _assign

    config = llama_family.parse_config({**CONFIGS["qwen3"]})
    embedding = torch.randn(config.vocab_size, config.hidden_size)
    for head, tied in ((embedding.clone(), True), (torch.randn_like(embedding), False)):
        model = llama_family.build(config, torch.float32)
        tensors = {
            name: torch.zeros(tuple(t.shape))
            for name, t in model.state_dict().items()
            if not name.startswith(("model.embed_tokens", "lm_head"))
        }
        tensors |= {"model.embed_tokens.weight": embedding, "lm_head.weight": head}
        _assign(model, tensors, {}, torch.device("cpu"))
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        assert torch.equal(model.lm_head.weight, head)


def test_generic_tokenizers_read_without_auto_classes_only_where_auto_would_agree() -> None:
    """A qwen2 checkpoint's generic tokenizer class is made Qwen2Tokenizer by AutoTokenizer
    (transformers' list of hub classes it corrects): such types go through AutoTokenizer
    (``tokenization.is_generic``; test_tokenization)."""
    from transformers.models.auto import tokenization_auto

    corrected = set(tokenization_auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)
    assert corrected & set(llama_family.DEFAULTS) == set(tokenization.OWN_TOKENIZER_TYPES)


def test_a_failed_capture_is_gone_before_the_eager_decoder_sizes_its_cache(
    lean: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback's cache is sized to the memory free once the failed decoder (its cache,
    graphs, fused weights) is released, not beside it."""
    made: list[weakref.ref[staticdecode.StaticDecoder]] = []
    build = staticdecode.StaticDecoder.__init__

    def recording(self: staticdecode.StaticDecoder, *args: Any, **kwargs: Any) -> None:
        gc.collect()
        assert all(ref() is None for ref in made), "the failed decoder is still alive"
        build(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(staticdecode.StaticDecoder, "__init__", recording)
    _first_capture_fails(monkeypatch)
    # pytest's log capture keeps each record, and the failed capture's record keeps its
    # traceback (the decoder in its frames); a service's handlers write a record and drop it.
    monkeypatch.setattr(logging.getLogger("metalserve.engine"), "propagate", False)
    batch = Engine(decode_mode="static", decode_compile="on")._new_batch(lean)
    assert isinstance(batch, StaticBatch)
    assert len(made) == 2
