"""The one Prometheus query client (instant queries over ``/api/v1/query``)."""

from __future__ import annotations

import math

import httpx

TIMEOUT_S = 5.0


class PrometheusError(Exception):
    """Prometheus could not be reached or refused the query (its message)."""


def query(client: httpx.Client, promql: str) -> list[tuple[dict[str, str], float]]:
    """The samples of an instant vector query: (labels, value), NaN values left out."""
    try:
        answer = client.get("/api/v1/query", params={"query": promql}, timeout=TIMEOUT_S)
        body = answer.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise PrometheusError(f"{promql}: {exc}") from exc
    if body.get("status") != "success":
        raise PrometheusError(f"{promql}: {body.get('errorType')}: {body.get('error')}")
    data = body.get("data", {})
    if data.get("resultType") != "vector":
        raise PrometheusError(f"{promql}: a {data.get('resultType')}, not a vector")
    try:
        samples = [(item["metric"], float(item["value"][1])) for item in data.get("result", [])]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise PrometheusError(f"{promql}: unexpected result {exc!r}") from exc
    return [(labels, value) for labels, value in samples if not math.isnan(value)]
