"""A served version's tokenizer, made from its verified files, in the two forms a replica uses.

The engine detokenizes with the tokenizers library's ``Tokenizer`` (``backend``) and needs the
special tokens' ids; the API side tokenizes prompts, renders chat templates and writes the texts
of log-probabilities (``prepare``, ``encode``, ``render_chat``, ``token_text``). Where
transformers' tokenizer would be its generic class over ``tokenizer.json`` with every token its
config names already in that file, the engine's form is read without importing transformers
(1.5-2 s of a start's interpreter time beside the weights: issue 17, item 4); the two then decode
alike (what changes at transformers' reading, such as truncation, padding or the post-processor,
acts on encoding only). Where moreover the config holds nothing that transformers' reading
turns into a change of the backend (``API_KEYS``), the API side needs no transformers either: it
encodes with the same backend and renders chat templates in transformers' Jinja environment
(``chat_template``), so an engine process's API process imports neither transformers nor torch.
Else the API side builds transformers' tokenizer, as before. Pickled, a tokenizer is its files
alone: an engine's process sends it so, and the API's process builds its own.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from jinja2 import Template
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

# transformers' lazy module is not safe to import from two threads at once (the second may find
# its names missing): every import of it in a replica goes through this.
IMPORTING_TRANSFORMERS = threading.Lock()

# Tokenizer classes that are transformers' tokenizers backend itself, with nothing of a model's
# own: read without importing transformers' auto classes (which import its modeling machinery).
GENERIC_TOKENIZERS = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend"})
# Model types whose checkpoints name a generic class where AutoTokenizer makes the model's own
# (transformers' MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS, of the Llama family): read by it.
OWN_TOKENIZER_TYPES = frozenset({"qwen2"})
# The named special tokens of a tokenizer's config (transformers' SPECIAL_TOKENS_ATTRIBUTES).
NAMED_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


# tokenizer_config.json's keys that the API side's own form reproduces or that change nothing it
# does: it encodes with the backend directly (as it did with transformers' form), transformers
# drops add_bos_token and add_eos_token where tokenizer.json exists, and add_prefix_space and
# legacy are mere attributes of the generic class. Any other key (a model's own "*_token", an
# auto_map, fix_mistral_regex, ...) sends the API side through transformers.
API_KEYS = frozenset(
    {
        "tokenizer_class",
        "backend",
        "added_tokens_decoder",
        *NAMED_TOKENS,
        "extra_special_tokens",
        "additional_special_tokens",
        "chat_template",
        "model_max_length",
        "model_input_names",
        "padding_side",
        "truncation_side",
        "clean_up_tokenization_spaces",
        "split_special_tokens",
        "add_bos_token",
        "add_eos_token",
        "add_prefix_space",
        "legacy",
    }
)
# transformers' single chat template file, beside which a folder may hold named ones.
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATES_DIR = "additional_chat_templates/"


class TokenizerError(ValueError):
    """A version's tokenizer files cannot be read."""


class OwnForm(NamedTuple):
    """The API side's tokenizer without transformers (``own_form``): the backend it encodes
    and decodes with, the named special tokens a chat template reads, the template compiled."""

    backend: Tokenizer
    special_tokens: dict[str, str]
    template: Template | None


class VersionTokenizer:
    """One version's tokenizer: ``backend`` for the engine, the API side's form (its own where
    ``own_form`` can make it, else transformers', built once from the same files), the special
    tokens' ids for both."""

    def __init__(
        self,
        files: Mapping[str, bytes],
        *,
        generic: bool,
        eos_token_id: int | None,
        pad_token_id: int | None,
        backend: Tokenizer | None = None,
        full: PreTrainedTokenizerBase | None = None,
    ) -> None:
        # The version's small files (config.json among them: AutoTokenizer may read it).
        self.files = dict(files)
        self.generic = generic
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self._backend = backend
        self._full = full
        self._api_form: OwnForm | PreTrainedTokenizerBase | None = None
        # Reentrant: the API form's build may build transformers' tokenizer under it.
        self._building = threading.RLock()

    @property
    def backend(self) -> Tokenizer:
        """The tokenizers library's tokenizer that the engine decodes with."""
        if self._backend is None:
            self._backend = self.transformers.backend_tokenizer
        return self._backend

    @property
    def transformers(self) -> PreTrainedTokenizerBase:
        """transformers' tokenizer of these files, built on first use (by the class
        AutoTokenizer would choose)."""
        full = self._full
        if full is None:  # once: built under the lock, read without it from then on
            with self._building:
                if self._full is None:
                    self._full = _transformers_tokenizer(self.files, generic=self.generic)
                full = self._full
        return full

    def prepare(self) -> OwnForm | PreTrainedTokenizerBase:
        """The API side's form, built now if not yet (the first request would wait for it):
        its own where the files allow (``own_form``), else transformers' tokenizer."""
        form = self._api_form
        if form is None:
            with self._building:
                if self._api_form is None:
                    own = own_form(self.files) if self.generic else None
                    self._api_form = own if own is not None else self.transformers
                form = self._api_form
        return form

    @property
    def own_api_form(self) -> bool:
        """Whether the API side runs without transformers (``prepare``'s form is its own)."""
        return isinstance(self.prepare(), OwnForm)

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """A prompt's ids as transformers' tokenizer makes them, by the Rust backend directly
        (thread-safe)."""
        form = self.prepare()
        backend = form.backend if isinstance(form, OwnForm) else form.backend_tokenizer
        ids: list[int] = backend.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    @property
    def has_chat_template(self) -> bool:
        form = self.prepare()
        if isinstance(form, OwnForm):
            return form.template is not None
        return form.chat_template is not None

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The messages in the model's chat template, a generation prompt after them, as
        transformers' ``apply_chat_template(tokenize=False, add_generation_prompt=True)``.
        Raises jinja2's ``TemplateError`` (the template's own ``raise_exception`` among them)."""
        form = self.prepare()
        if isinstance(form, OwnForm):
            from metalserve import chat_template  # the API side's only (Jinja)

            assert form.template is not None, "no chat template (has_chat_template)"
            return chat_template.render(form.template, messages, form.special_tokens)
        return str(form.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def token_text(self, token: int) -> str:
        """One token's text, as transformers' ``decode([token])`` writes it."""
        form = self.prepare()
        if isinstance(form, OwnForm):
            text: str = form.backend.decode([token], skip_special_tokens=False)
            return text
        return str(form.decode([token]))

    def __getstate__(self) -> dict[str, Any]:
        # The files, not what was built from them: megabytes of vocabulary either way, and
        # the receiving process builds the form it uses.
        return {
            "files": self.files,
            "generic": self.generic,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["files"],
            generic=state["generic"],
            eos_token_id=state["eos_token_id"],
            pad_token_id=state["pad_token_id"],
        )


def read(files: Mapping[str, bytes], model_type: Any, *, family: bool) -> VersionTokenizer:
    """``files``' tokenizer (the version's small files, verified). ``family``: the model is
    of the Llama family, built by metalserve (``OWN_TOKENIZER_TYPES`` knows its types'
    tokenizers): a generic tokenizer whose config adds nothing to ``tokenizer.json`` is read
    without transformers. Else by transformers, here and now."""
    generic = family and is_generic(files, model_type)
    if generic:
        lean = _lean(files)
        if lean is not None:
            return lean
    full = _transformers_tokenizer(files, generic=generic)
    if not getattr(full, "is_fast", False):
        raise TokenizerError("only fast (tokenizer.json) tokenizers are supported")
    return VersionTokenizer(
        files,
        generic=generic,
        eos_token_id=full.eos_token_id,
        pad_token_id=full.pad_token_id,
        full=full,
    )


def is_generic(files: Mapping[str, bytes], model_type: Any) -> bool:
    """Whether ``files``' tokenizer is transformers' tokenizers backend as AutoTokenizer would
    make it for ``model_type``."""
    if model_type in OWN_TOKENIZER_TYPES or "tokenizer.json" not in files:
        return False
    settings = _settings(files)
    return settings is not None and settings.get("tokenizer_class") in GENERIC_TOKENIZERS


def _settings(files: Mapping[str, bytes]) -> dict[str, Any] | None:
    try:
        settings = json.loads(files["tokenizer_config.json"])
    except (KeyError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


def _lean(files: Mapping[str, bytes]) -> VersionTokenizer | None:
    """The engine's form without transformers, or None where transformers' reading would add
    or change a token of ``tokenizer.json`` (``_lean_parts``)."""
    parts = _lean_parts(files)
    if parts is None:
        return None
    backend, named, _ = parts
    added = {token.content: index for index, token in backend.get_added_tokens_decoder().items()}
    return VersionTokenizer(
        files,
        generic=True,
        eos_token_id=added.get(named.get("eos_token", "")),
        pad_token_id=added.get(named.get("pad_token", "")),
        backend=backend,
    )


def own_form(files: Mapping[str, bytes]) -> OwnForm | None:
    """The API side's form without transformers, or None where transformers' reading would
    make the backend otherwise: its tokens (``_lean_parts``), the config's other keys
    (``API_KEYS``), a cleanup of decoded text that transformers applies (not to BPE models), or
    a chat template it finds otherwise than in ``chat_template.jinja`` or the config's
    string. What its reading does change, this does too: the split of special tokens."""
    parts = _lean_parts(files)
    if parts is None:
        return None
    backend, named, settings = parts
    # A file without a post-processor gets one from transformers that adds nothing (add_bos_token
    # and add_eos_token are dropped where tokenizer.json exists): the same ids without it.
    if not set(settings) <= API_KEYS:
        return None
    if settings.get("clean_up_tokenization_spaces") not in (None, False) and (
        type(backend.model).__name__ != "BPE"
    ):
        return None
    split = settings.get("split_special_tokens", False)
    if not isinstance(split, bool):
        return None
    backend.encode_special_tokens = split  # as transformers sets it
    if any(name.startswith(TEMPLATES_DIR) for name in files):
        return None  # named templates: transformers chooses among them
    from metalserve import chat_template  # the API side's only (Jinja)

    text = settings.get("chat_template")
    try:
        if TEMPLATE_FILE in files:
            text = files[TEMPLATE_FILE].decode("utf-8")
        if not isinstance(text, str | None):
            return None  # a list of named templates
        template = None if text is None else chat_template.compile_template(text)
    except Exception:  # noqa: BLE001 - transformers' form reports it, as before
        return None
    return OwnForm(backend, named, template)


def _lean_parts(
    files: Mapping[str, bytes],
) -> tuple[Tokenizer, dict[str, str], dict[str, Any]] | None:
    """``tokenizer.json``'s backend, the named special tokens (attribute -> text) and the
    config, or None where transformers' reading would add or change a token of that file (a
    new id, or one a decode skips or keeps otherwise): every token the config names must be a
    special token of that file, and every added token it lists one with the same id and
    flag."""
    from tokenizers import Tokenizer

    settings = _settings(files)
    if settings is None or "added_tokens.json" in files:
        return None  # legacy files, whose tokens transformers adds to the backend's
    listed = settings.get("added_tokens_decoder")
    if listed is None and "special_tokens_map.json" in files:
        return None  # read only without the list: named tokens that may differ from the config's
    try:
        backend = Tokenizer.from_str(files["tokenizer.json"].decode())
    except Exception as exc:  # the Rust side raises plain Exceptions
        raise TokenizerError(f"tokenizer.json: {exc}") from exc
    added = {
        token.content: (index, token.special)
        for index, token in backend.get_added_tokens_decoder().items()
    }
    if not isinstance(listed, dict | None):
        return None
    for index, token in (listed or {}).items():
        content = _content(token)
        special = isinstance(token, dict) and token.get("special", False) is True
        if content is None or not index.isdigit() or added.get(content) != (int(index), special):
            return None
    named: dict[str, str] = {}
    for attribute in NAMED_TOKENS:
        content = _content(settings.get(attribute))
        if content is not None:
            named[attribute] = content
    extras: list[Any] = []
    for key in ("extra_special_tokens", "additional_special_tokens"):
        extra = settings.get(key) or []
        if isinstance(extra, dict):
            extra = list(extra.values())
        if not isinstance(extra, list):
            return None
        extras += extra
    padding = backend.padding
    if "pad_token" not in named and padding is not None:
        named["pad_token"] = padding["pad_token"]  # as transformers takes it
    contents = [*named.values(), *(_content(token) for token in extras)]
    if any(added.get(content or "", (0, False))[1] is not True for content in contents):
        return None
    return backend, named, settings


def _content(token: Any) -> str | None:
    """A config's token: its text, written as a string or as an AddedToken's fields."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _transformers_tokenizer(
    files: Mapping[str, bytes], *, generic: bool
) -> PreTrainedTokenizerBase:
    """transformers' tokenizer of ``files``, read from a folder of them (its readers take
    folders): the generic class where AutoTokenizer would make it (no auto classes: they
    import the modeling machinery), else AutoTokenizer."""
    reader: Any
    with IMPORTING_TRANSFORMERS:
        if generic:
            from transformers import PreTrainedTokenizerFast as reader
        else:
            from transformers import AutoTokenizer as reader
    with tempfile.TemporaryDirectory(prefix="metalserve-tokenizer-") as tmp:
        for name, data in files.items():
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        try:
            tokenizer: PreTrainedTokenizerBase = reader.from_pretrained(tmp, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise TokenizerError(str(exc)) from exc
    return tokenizer
