"""A version's tokenizer: the engine's form read without transformers only where it decodes as
transformers' tokenizer of the same files does, and the API side's form without transformers only
where it encodes, renders chat templates and writes tokens' texts as transformers' does."""

from __future__ import annotations

import json
import pickle
import re
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
    # The API side's form: its own, and nothing of transformers built for it.
    assert lean.own_api_form
    assert lean._full is None
    assert lean.has_chat_template
    assert lean.encode("Hello", add_special_tokens=True)[0] == _transformers(files).bos_token_id


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


# --- the API side's form -------------------------------------------------------------------

CHATS: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi <s> there </s>"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "  ünïcödé 🙂\n<|user|> "},
    ],
)
# Templates of the field (shortened; their constructs kept): Llama 3's, ChatML's (Qwen), a
# Mistral-style one that raises on a system message, and one with transformers' extras.
TEMPLATES = {
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] "
        "| trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content "
        "%}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
        "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
        "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
        "'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "extras": (
        "{%- for message in messages %}\n"
        "  {%- if message.role == 'system' %}\n"
        "    {%- continue %}\n"
        "  {%- endif %}\n"
        "  <|{{ message.role }}|>\n"
        "  {% generation %}{{ message.content | tojson }}{% endgeneration %}\n"
        "  {{ message | tojson(indent=1, sort_keys=True) }}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}<|assistant|>{{ pad_token }}{{ strftime_now('%Y') }}"
        "{% endif %}"
    ),
}


def _same_api_side(files: dict[str, bytes]) -> VersionTokenizer:
    """The API side's own form of ``files`` does what transformers' tokenizer of them does:
    every text's ids with and without special tokens (by transformers' encode itself), every
    token's text, every chat's rendering (or the same template error)."""
    from jinja2 import TemplateError

    tokenizer = VersionTokenizer(files, generic=True, eos_token_id=None, pad_token_id=None)
    assert tokenizer.own_api_form
    full = _transformers(files)
    assert tokenizer.has_chat_template == (full.chat_template is not None)
    texts = list(TEXTS)
    for chat in CHATS if tokenizer.has_chat_template else ():
        try:
            expected = full.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except TemplateError as exc:
            with pytest.raises(TemplateError, match=re.escape(str(exc))):
                tokenizer.render_chat(chat)
            continue
        assert tokenizer.render_chat(chat) == expected
        texts.append(expected)
    for text in texts:
        for special in (True, False):
            expected = full.encode(text, add_special_tokens=special)
            assert tokenizer.encode(text, add_special_tokens=special) == expected, (text, special)
    for token in range(len(full)):
        assert tokenizer.token_text(token) == full.decode([token]), token
    assert tokenizer._full is None, "transformers' tokenizer was built for the API side"
    return tokenizer


def _with_template(files: dict[str, bytes], template: str) -> dict[str, bytes]:
    return {**files, tokenization.TEMPLATE_FILE: template.encode()}


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_the_api_side_renders_chat_templates_as_transformers(
    model_dirs: dict[int, Path], template: str
) -> None:
    _same_api_side(_with_template(_files(model_dirs[1]), TEMPLATES[template]))


def _template_in_config(files: dict[str, bytes]) -> dict[str, bytes]:
    template = files.pop(tokenization.TEMPLATE_FILE).decode()
    return _edited(files, "tokenizer_config.json", lambda c: c.update(chat_template=template))


def _special_tokens_normalized(files: dict[str, bytes]) -> dict[str, bytes]:
    def edit(tokenizer: dict[str, Any]) -> None:
        for token in tokenizer["added_tokens"]:
            token.update(normalized=True, lstrip=True)

    return _edited(files, "tokenizer.json", edit)


@pytest.mark.parametrize(
    "variant",
    [
        lambda f: f,
        _template_in_config,
        _special_tokens_normalized,
        # BPE: transformers leaves decoded text as it is, whatever the flag says (Llama 3's).
        lambda f: _edited(
            f, "tokenizer_config.json", lambda c: c.update(clean_up_tokenization_spaces=True)
        ),
        lambda f: _edited(
            f, "tokenizer_config.json", lambda c: c.update(split_special_tokens=True)
        ),
        # Dropped by transformers where tokenizer.json exists.
        lambda f: _edited(
            f, "tokenizer_config.json", lambda c: c.update(add_bos_token=False, add_eos_token=True)
        ),
        # No post-processor in the file (transformers makes one that adds nothing).
        lambda f: _edited(f, "tokenizer.json", lambda t: t.update(post_processor=None)),
    ],
    ids=[
        "as-made",
        "template-in-config",
        "normalized",
        "cleanup",
        "split",
        "add-eos",
        "no-post-processor",
    ],
)
def test_the_api_side_encodes_and_writes_tokens_as_transformers(
    model_dirs: dict[int, Path], variant: Any
) -> None:
    _same_api_side(variant(dict(_files(model_dirs[1]))))


def test_the_bench_models_word_level_tokenizer_is_the_api_sides_own(tmp_path: Path) -> None:
    """``bench serve``'s stand-in models (no post-processor, no chat template): their API
    process needs no transformers either."""
    from metalserve.bench.serve import build_tokenizer

    build_tokenizer(64, 128).save_pretrained(tmp_path)
    _same_api_side(_files(tmp_path))


@pytest.mark.parametrize(
    "variant",
    [
        lambda f: _edited(
            f, "tokenizer_config.json", lambda c: c.update(auto_map={"AutoTokenizer": ["x", None]})
        ),
        lambda f: _edited(f, "tokenizer_config.json", lambda c: c.update(fix_mistral_regex=True)),
        lambda f: _edited(f, "tokenizer_config.json", lambda c: c.update(image_token="<|user|>")),
        lambda f: {**f, "additional_chat_templates/tool_use.jinja": b"{{ messages }}"},
        lambda f: _edited(
            {k: v for k, v in f.items() if k != tokenization.TEMPLATE_FILE},
            "tokenizer_config.json",
            lambda c: c.update(chat_template=[{"name": "default", "template": "{{ messages }}"}]),
        ),
        lambda f: _with_template(f, "{% for message in messages %}"),  # transformers fails later
    ],
    ids=[
        "auto-map",
        "mistral-regex",
        "model-token",
        "named-templates",
        "template-list",
        "bad-template",
    ],
)
def test_what_transformers_reads_otherwise_gives_the_api_side_transformers(
    model_dirs: dict[int, Path], variant: Any
) -> None:
    files = variant(dict(_files(model_dirs[1])))
    assert tokenization.own_form(files) is None
    tokenizer = VersionTokenizer(files, generic=True, eos_token_id=None, pad_token_id=None)
    assert not tokenizer.own_api_form
    assert tokenizer._full is not None


def test_a_word_level_model_whose_decoding_transformers_cleans_up_gets_transformers(
    tmp_path: Path,
) -> None:
    """Not BPE, with clean_up_tokenization_spaces: transformers rewrites decoded text (" ." to
    "."), which the API side's own form does not: transformers' it is."""
    from metalserve.bench.serve import build_tokenizer

    build_tokenizer(64, 128).save_pretrained(tmp_path)
    files = _edited(
        _files(tmp_path),
        "tokenizer_config.json",
        lambda c: c.update(clean_up_tokenization_spaces=True),
    )
    assert tokenization.own_form(files) is None


def test_a_received_tokenizer_builds_the_api_sides_own_form(model_dirs: dict[int, Path]) -> None:
    tokenizer = tokenization.read(_files(model_dirs[1]), "llama", family=True)
    received = pickle.loads(pickle.dumps(tokenizer))  # noqa: S301 (our own bytes)
    assert received.own_api_form
    assert received.render_chat(CHATS[1]) == tokenizer.render_chat(CHATS[1])
