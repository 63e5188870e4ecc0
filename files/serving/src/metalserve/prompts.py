"""A request's prompts as token ids and its sampling parameters, checked against the model.

Everything a client can get wrong about its prompt or token budget is refused here, with a 400,
before anything reaches the engine. Tokenizing runs in a worker thread (the caller's choice).
"""

from __future__ import annotations

from metalserve.errors import ApiError
from metalserve.loader import ModelView
from metalserve.sampling import SamplingParams
from metalserve.schemas import ChatCompletionRequest, CompletionRequest
from metalserve.settings import ServeSettings

# Text longer than this many characters per allowed token cannot fit; refuse before tokenizing.
MAX_CHARS_PER_TOKEN = 64
# A request with at most this many characters of text is tokenized on the event loop: a thread
# costs more than that under load (a wake-up, and the GIL handed over and back on each side
# while the engine thread wants it too). Longer text goes to a thread, so that the loop keeps
# streaming while the tokenizer runs.
INLINE_TEXT_CHARS = 2048
# ...and a chat of at most this many messages (its template renders them in Python).
INLINE_MESSAGES = 64


def tokenized_inline(body: CompletionRequest | ChatCompletionRequest) -> bool:
    """Whether ``body``'s prompts are prepared on the event loop (token ids, or short text)."""
    if isinstance(body, CompletionRequest):
        chars = sum(len(p) for p in body.prompts() if isinstance(p, str))
    else:
        if len(body.messages) > INLINE_MESSAGES:
            return False
        chars = sum(len(m.text()) + len(m.name or "") for m in body.messages)
    return chars <= INLINE_TEXT_CHARS


def _prompt_limit(settings: ServeSettings, bundle: ModelView) -> int:
    limit = bundle.max_context - 1
    return min(limit, settings.max_prompt_tokens) if settings.max_prompt_tokens else limit


def _check_prompt(settings: ServeSettings, bundle: ModelView, ids: list[int]) -> list[int]:
    limit = _prompt_limit(settings, bundle)
    if len(ids) > limit:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens; at most {limit} are allowed",
            param="prompt",
            code="context_length_exceeded",
        )
    vocab = bundle.vocab_size
    if any(t >= vocab for t in ids):
        raise ApiError(
            400, f"token ids must be below {vocab}", param="prompt", code="invalid_token"
        )
    return ids


def _encode(
    settings: ServeSettings, bundle: ModelView, text: str, *, add_special_tokens: bool, param: str
) -> list[int]:
    limit = _prompt_limit(settings, bundle)
    if len(text) > limit * MAX_CHARS_PER_TOKEN:
        raise ApiError(400, f"the {param} is too long", param=param, code="context_length_exceeded")
    try:
        return bundle.encode(text, add_special_tokens=add_special_tokens)
    except (TypeError, ValueError, UnicodeError) as exc:
        raise ApiError(400, f"cannot tokenize the {param}: {exc}", param=param) from exc


def completion_prompts(
    settings: ServeSettings, bundle: ModelView, body: CompletionRequest
) -> list[list[int]]:
    """The token ids of every prompt of a /v1/completions request (text or ids)."""
    result = []
    for prompt in body.prompts():
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "the prompt must not be empty", param="prompt")
            prompt = _encode(settings, bundle, prompt, add_special_tokens=True, param="prompt")
        result.append(_check_prompt(settings, bundle, prompt))
    return result


def chat_prompt(
    settings: ServeSettings, bundle: ModelView, body: ChatCompletionRequest
) -> list[int]:
    """The token ids of a chat's messages rendered by the model's chat template."""
    from jinja2 import TemplateError

    messages = []
    for message in body.messages:
        entry = {"role": message.role, "content": message.text()}
        if message.name:
            entry["name"] = message.name
        messages.append(entry)
    if not any(m["content"] for m in messages):
        raise ApiError(400, "the messages hold no text", param="messages")
    tokenizer = bundle.tokenizer
    if not tokenizer.has_chat_template:
        raise ApiError(
            400, "this model has no chat template; use /v1/completions", param="messages"
        )
    try:
        text = tokenizer.render_chat(messages)
    except (TemplateError, ValueError, TypeError, KeyError) as exc:
        raise ApiError(
            400, f"the chat template rejected the messages: {exc}", param="messages"
        ) from exc
    # The template already placed BOS and other special tokens.
    ids = _encode(settings, bundle, text, add_special_tokens=False, param="messages")
    return _check_prompt(settings, bundle, ids)


def sampling_params(
    settings: ServeSettings,
    bundle: ModelView,
    body: CompletionRequest | ChatCompletionRequest,
    requested: int | None,
    prompts: list[list[int]],
    default: int | None,
) -> SamplingParams:
    """The request's sampling parameters; ``max_tokens`` within the server's limit and the room
    the longest prompt leaves in the context (``requested`` None: ``default``, else all)."""
    room = bundle.max_context - max(len(p) for p in prompts)
    if requested is None:
        # Unspecified: as much as fits (chat), or the completions default, within the limits.
        max_tokens = min(default or settings.max_new_tokens, settings.max_new_tokens, room)
    else:
        if requested > settings.max_new_tokens:
            raise ApiError(
                400,
                f"max_tokens is {requested}; this server allows at most {settings.max_new_tokens}",
                param="max_tokens",
            )
        if requested > room:
            raise ApiError(
                400,
                f"the prompt plus max_tokens ({requested}) exceeds the context of "
                f"{bundle.max_context} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        max_tokens = requested
    if max_tokens < 1:
        raise ApiError(
            400,
            "the prompt leaves no room to generate",
            param="prompt",
            code="context_length_exceeded",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=None if body.seed is None else body.seed % 2**63,
        stop=body.stop_strings(),
        ignore_eos=body.ignore_eos,
        logprobs=getattr(body, "logprobs", None),
    )
