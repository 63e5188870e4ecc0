"""Cross-replica consistency check: the same greedy request must give the same text everywhere.

Run after a rolling update: replicas that disagree serve different weights (or a different
tokenizer, template or code), whatever their /version claims.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

DEFAULT_PROMPT = "The quick brown fox"
DEFAULT_MAX_TOKENS = 32


@dataclass(frozen=True, slots=True)
class ReplicaAnswer:
    url: str
    version_id: str | None
    text: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def ask(
    client: httpx.Client,
    url: str,
    prompt: str,
    *,
    model: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> ReplicaAnswer:
    base = url.rstrip("/")
    version_id = None
    try:
        version = client.get(f"{base}/version")
        version.raise_for_status()
        info = version.json()
        version_id = info.get("version_id")
        response = client.post(
            f"{base}/v1/completions",
            json={
                "model": model or info["model"],
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "seed": 0,
            },
        )
        response.raise_for_status()
        text = response.json()["choices"][0]["text"]
    except httpx.HTTPStatusError as exc:
        return ReplicaAnswer(url, version_id, None, f"HTTP {exc.response.status_code}")
    except httpx.HTTPError as exc:
        return ReplicaAnswer(url, version_id, None, f"unreachable: {type(exc).__name__}")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return ReplicaAnswer(url, version_id, None, f"bad response: {exc}")
    return ReplicaAnswer(url, version_id, str(text))


def check(
    urls: Sequence[str],
    prompt: str = DEFAULT_PROMPT,
    *,
    model: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    timeout: float = 60.0,
) -> tuple[bool, list[ReplicaAnswer]]:
    """Ask every replica; consistent when all answered and all texts are identical."""
    with httpx.Client(timeout=timeout) as client:
        answers = [ask(client, u, prompt, model=model, max_tokens=max_tokens) for u in urls]
    texts = {a.text for a in answers if a.ok}
    return all(a.ok for a in answers) and len(texts) == 1, answers


def render_table(answers: Sequence[ReplicaAnswer]) -> str:
    """One row per replica; identical outputs share a group letter (A is the most common)."""
    counts = Counter(a.text for a in answers if a.ok)
    groups = {text: chr(ord("A") + i) for i, (text, _) in enumerate(counts.most_common())}
    rows = [("replica", "version", "group", "output")]
    for a in answers:
        output = repr(a.text)[:60] if a.ok else a.error or "?"
        rows.append(
            (a.url, (a.version_id or "?")[:12], groups.get(a.text, "-") if a.ok else "FAIL", output)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3]
        for row in rows
    )
