"""A version's tokenizer: the engine's form read without transformers only where it decodes as
transformers' tokenizer of the same files does."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from metalserve import tokenization
from metalserve.tokenization import VersionTokenizer

TEXTS = ("The quick brown fox", "Paris. Four! 0123 ünïcödé 🙂", "<|user|>\nhi</s>")


def _files(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in model_dir.iterdir() if p.suffix != ".safetensors"}


def _edited(files: dict[str, bytes], name: str, edit: Any) -> dict[str, bytes]:
    data = json.loads(files[name])
    edit(data)
    return {**files, name: json.dumps(data).encode()}


def _transformers(files: dict[str, bytes]) -> Any:
    return tokenization._transformers_tokenizer(files, generic=True)


def _same_decoding(lean: VersionTokenizer, full: Any) -> None:
    """Every id alone, and a few texts' ids, decode alike with and without special tokens;
    the special ids agree."""
    assert (lean.eos_token_id, lean.pad_token_id) == (full.eos_token_id, full.pad_token_id)
    backend = lean.backend
    assert backend.get_vocab_size() == full.backend_tokenizer.get_vocab_size()
    sequences = [[i] for i in range(len(full))]
    sequences += [full.backend_tokenizer.encode(text).ids for text in TEXTS]
    for ids in sequences:
        for skip in (True, False):
            assert backend.decode(ids, skip_special_tokens=skip) == full.backend_tokenizer.decode(
                ids, skip_special_tokens=skip
            ), ids


def test_a_generic_tokenizer_is_read_without_transformers_and_decodes_as_its(
    model_dirs: dict[int, Path],
) -> None:
    files = _files(model_dirs[1])
    lean = tokenization.read(files, "llama", family=True)
    assert lean._full is None, "read by transformers"
    _same_decoding(lean, _transformers(files))
    # The API side's form: transformers' tokenizer of the same files, its chat template too.
    assert lean.transformers.chat_template is not None
    assert lean.encode("Hello", add_special_tokens=True)[0] == lean.transformers.bos_token_id


def test_a_pad_token_from_tokenizer_json_padding_is_transformers_pad(
    model_dirs: dict[int, Path],
) -> None:
    files = _edited(
        _edited(_files(model_dirs[1]), "tokenizer_config.json", lambda c: c.pop("pad_token")),
        "tokenizer.json",
        lambda t: t.update(
            padding={
                "strategy": "BatchLongest",
                "direction": "Right",
                "pad_to_multiple_of": None,
                "pad_id": 2,
                "pad_type_id": 0,
                "pad_token": "</s>",
            }
        ),
    )
    lean = tokenization._lean(files)
    assert lean is not None
    assert lean.pad_token_id == 2
    _same_decoding(lean, _transformers(files))


def _unlisted_token(config: dict[str, Any]) -> None:
    config["added_tokens_decoder"] = {
        "1024": {"content": "<|tool|>", "special": True, "lstrip": False, "rstrip": False}
    }


def _eos_not_in_file(config: dict[str, Any]) -> None:
    config["eos_token"] = "<|end|>"


def _not_special(tokenizer: dict[str, Any]) -> None:
    tokenizer["added_tokens"][2]["special"] = False  # "</s>", the config's eos


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        ("tokenizer_config.json", _unlisted_token),
        ("tokenizer_config.json", _eos_not_in_file),
        ("tokenizer.json", _not_special),
    ],
)
def test_where_transformers_would_change_the_tokens_the_engine_reads_with_it(
    model_dirs: dict[int, Path], name: str, edit: Any
) -> None:
    """Each of these makes transformers' reading add a token or change its flag: a lean
    reading would decode otherwise (shown), so the engine's form is transformers'."""
    files = _edited(_files(model_dirs[1]), name, edit)
    assert tokenization._lean(files) is None
    full = _transformers(files)
    from tokenizers import Tokenizer

    raw = Tokenizer.from_str(files["tokenizer.json"].decode())
    assert any(
        raw.decode([i], skip_special_tokens=skip)
        != full.backend_tokenizer.decode([i], skip_special_tokens=skip)
        for i in range(len(full))
        for skip in (True, False)
    ), "the edit changed nothing that a lean reading would get wrong"
    tokenizer = tokenization.read(files, "llama", family=True)
    assert tokenizer._full is not None
    assert tokenizer.eos_token_id == full.eos_token_id
    assert tokenizer.pad_token_id == full.pad_token_id


@pytest.mark.parametrize("legacy", ["added_tokens.json", "special_tokens_map.json"])
def test_legacy_token_files_send_the_reading_to_transformers(
    model_dirs: dict[int, Path], legacy: str
) -> None:
    files = {**_files(model_dirs[1]), legacy: b"{}"}
    assert tokenization._lean(files) is None


def test_only_generic_classes_of_known_types_are_read_lean(model_dirs: dict[int, Path]) -> None:
    files = _files(model_dirs[1])
    assert tokenization.is_generic(files, "llama")
    assert not tokenization.is_generic(files, "qwen2")  # AutoTokenizer makes Qwen2Tokenizer
    named = _edited(files, "tokenizer_config.json", lambda c: c.update(tokenizer_class="X"))
    assert not tokenization.is_generic(named, "llama")
    assert tokenization.read(files, "llama", family=False)._full is not None


def test_pickled_it_is_its_files_and_the_receiver_builds_its_own(
    model_dirs: dict[int, Path],
) -> None:
    tokenizer = tokenization.read(_files(model_dirs[1]), "llama", family=True)
    received = pickle.loads(pickle.dumps(tokenizer))  # noqa: S301 (our own bytes)
    assert received._backend is None
    assert received._full is None
    assert received.files == tokenizer.files
    assert received.eos_token_id == tokenizer.eos_token_id
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=True)
        assert received.encode(text, add_special_tokens=True) == ids
        assert received.backend.decode(ids) == tokenizer.backend.decode(ids)


def test_unreadable_files_are_named(model_dirs: dict[int, Path]) -> None:
    files = {**_files(model_dirs[1]), "tokenizer.json": b"{not json"}
    with pytest.raises(tokenization.TokenizerError, match=r"tokenizer\.json"):
        tokenization.read(files, "llama", family=True)
