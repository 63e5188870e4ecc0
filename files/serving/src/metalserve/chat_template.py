"""Chat templates rendered as transformers renders them, without importing transformers.

transformers' ``apply_chat_template`` compiles a model's template in a sandboxed Jinja
environment of its own (``transformers.utils.chat_template_utils``: blocks trimmed, its
``tojson``, ``raise_exception``, ``strftime_now``, loop controls, and a ``{% generation %}``
tag) and renders it with the messages, ``add_generation_prompt`` and the tokenizer's named
special tokens. This module is that environment, so that the API process of a replica whose
tokenizer needs nothing else of transformers (``metalserve.tokenization.own_form``) renders
the same text; tests compare the two on the templates of the field.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks the assistant's part with
    it (for training masks); rendered, it is its body."""

    tags = {"generation"}  # noqa: RUF012 - jinja2's class attribute

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        block = jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body)
        block.set_lineno(lineno)
        return block

    def _body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' own: Jinja's escapes HTML characters.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)  # local time, as transformers


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


_ENVIRONMENT = _environment()


def compile_template(text: str) -> jinja2.Template:
    """A chat template compiled (raises jinja2's ``TemplateSyntaxError``)."""
    return _ENVIRONMENT.from_string(text)


def render(
    template: jinja2.Template, messages: list[dict[str, str]], special_tokens: dict[str, str]
) -> str:
    """The messages rendered with a generation prompt after them, the tokenizer's named special
    tokens (``bos_token``, ...) in scope, no tools and no documents: transformers'
    ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``."""
    return template.render(
        messages=messages,
        tools=None,
        documents=None,
        add_generation_prompt=True,
        **special_tokens,
    )
