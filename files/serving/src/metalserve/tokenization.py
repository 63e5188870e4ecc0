"""A served version's tokenizer, made from its verified files, in the two forms a replica uses.

The engine detokenizes with the tokenizers library's ``Tokenizer`` (``backend``) and needs the
special tokens' ids; the API side tokenizes prompts, renders chat templates and writes the texts
of log-probabilities with transformers' tokenizer (``transformers``), built from the same files
when first asked. Where transformers' tokenizer would be its generic class over ``tokenizer.json``
with every token its config names already in that file, the engine's form is read without
importing transformers (1.5-2 s of a start's interpreter time beside the weights: issue 17,
item 4); the two then decode alike (what changes at transformers' reading, such as truncation,
padding or the post-processor, acts on encoding only). Pickled, a tokenizer is its files alone:
an engine's process sends it so, and the API's process builds its own.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


class TokenizerError(ValueError):
    """A version's tokenizer files cannot be read."""


class VersionTokenizer:
    """One version's tokenizer: ``backend`` for the engine, ``transformers`` for the API side
    (built once, on first use, from the same files), the special tokens' ids for both."""

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
        self._building = threading.Lock()

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

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """A prompt's ids as transformers' tokenizer makes them, by its Rust backend directly
        (thread-safe)."""
        ids: list[int] = self.transformers.backend_tokenizer.encode(
            text, add_special_tokens=add_special_tokens
        ).ids
        return ids

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
    or change a token of ``tokenizer.json`` (a new id, or one a decode skips or keeps
    otherwise): every token the config names must be a special token of that file, and
    every added token it lists one with the same id and flag."""
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
    ids = {attribute: added[content][0] for attribute, content in named.items()}
    return VersionTokenizer(
        files,
        generic=True,
        eos_token_id=ids.get("eos_token"),
        pad_token_id=ids.get("pad_token"),
        backend=backend,
    )


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
