"""The autoscaler's loop: observe (HAProxy, Prometheus), decide (``policy``), act, account."""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from types import FrameType

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from metalserve.autoscale import haproxy, prometheus
from metalserve.autoscale.policy import Decision, Observation, State, decide
from metalserve.settings import AutoscaleSettings

log = logging.getLogger(__name__)

# Running and waiting requests of each replica (the scrape config's ``replica`` label is the
# HAProxy server's name).
REQUESTS_QUERY = (
    "sum by (replica) (metalserve_num_requests_running)"
    " + sum by (replica) (metalserve_num_requests_waiting)"
)
# Over the backend's replicas in rotation only: other models' replicas are scraped alike.
TTFT_QUERY = (
    "histogram_quantile(0.99, sum by (le) "
    '(rate(metalserve_time_to_first_token_seconds_bucket{{replica=~"{replicas}"}}[1m])))'
)


def ttft_query(replicas: tuple[str, ...]) -> str:
    """TTFT_QUERY for these replicas (a PromQL string literal holding an RE2 alternation)."""
    pattern = "|".join(re.escape(name) for name in replicas)
    return TTFT_QUERY.format(replicas=pattern.replace("\\", "\\\\"))


class AutoscaleMetrics:
    """What the controller exports (its own registry, served on ``metrics_port``)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.decisions = Counter(
            "metalserve_autoscaler_decisions",
            "Evaluations by decision (promote, retire, hold)",
            ["action"],
            registry=r,
        )
        self.errors = Counter(
            "metalserve_autoscaler_errors",
            "Evaluations that could not observe (prometheus, haproxy) or act",
            ["kind"],
            registry=r,
        )
        self.servers = Gauge(
            "metalserve_autoscaler_servers",
            "Servers by role: active (in rotation), standby (healthy, out of rotation), "
            "promoted (standbys now in rotation)",
            ["role"],
            registry=r,
        )
        self.load = Gauge(
            "metalserve_autoscaler_load_per_active_server",
            "Running and waiting requests per server in rotation (NaN when unknown)",
            registry=r,
        )
        self.last_action = Gauge(
            "metalserve_autoscaler_last_action_timestamp_seconds",
            "Unix time of the last promotion or retirement",
            registry=r,
        )


class Controller:
    """One HAProxy backend's standbys, promoted and retired by ``policy``."""

    def __init__(
        self,
        settings: AutoscaleSettings,
        api: haproxy.RuntimeAPI,
        client: httpx.Client,
        metrics: AutoscaleMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.policy = settings.policy()
        self.api = api
        self.client = client
        self.metrics = metrics or AutoscaleMetrics()
        self.state = State()

    def evaluate(self, now: float | None = None) -> Decision:
        """One evaluation: observe, decide, act (unless a dry run); logged and counted."""
        now = time.monotonic() if now is None else now
        backend = self.settings.backend
        try:
            servers = self.api.servers(backend)
        except haproxy.RuntimeAPIError as exc:
            return self._failed("haproxy", f"cannot read {backend}'s servers: {exc}")
        seen = self._observe(servers)
        decision = decide(self.policy, self.state, seen, now)
        self.metrics.servers.labels(role="active").set(len(seen.active))
        self.metrics.servers.labels(role="standby").set(len(seen.standbys))
        self.metrics.servers.labels(role="promoted").set(len(seen.promoted))
        self.metrics.load.set(float("nan") if seen.load is None else seen.load)
        if decision.action != "hold" and decision.server is not None:
            weight = self.settings.weight if decision.action == "promote" else 0
            if not self.settings.dry_run:
                try:
                    self.api.set_weight(backend, decision.server, weight)
                except haproxy.RuntimeAPIError as exc:
                    return self._failed("haproxy", f"cannot {decision.action}: {exc}")
            self.metrics.last_action.set_to_current_time()
            log.info(
                "%s%s %s/%s (weight %d): %s",
                "dry run: would " if self.settings.dry_run else "",
                decision.action,
                backend,
                decision.server,
                weight,
                decision.reason,
            )
        else:
            log.debug("hold: %s", decision.reason)
        self.metrics.decisions.labels(action=decision.action).inc()
        return decision

    def _observe(self, servers: list[haproxy.Server]) -> Observation:
        active = tuple(s.name for s in servers if s.weight > 0 and s.healthy)
        standbys = tuple(
            s.name for s in servers if s.initial_weight == 0 and s.weight == 0 and s.healthy
        )
        promoted = tuple(s.name for s in servers if s.initial_weight == 0 and s.weight > 0)
        try:
            per_replica = {
                labels.get("replica", ""): value
                for labels, value in prometheus.query(self.client, REQUESTS_QUERY)
            }
            ttft = None
            if self.settings.ttft_p99_up_at is not None and active:
                values = [value for _, value in prometheus.query(self.client, ttft_query(active))]
                ttft = values[0] if values else None
        except prometheus.PrometheusError as exc:
            self.metrics.errors.labels(kind="prometheus").inc()
            log.warning("cannot read the replicas' load: %s", exc)
            return Observation(active, standbys, promoted, None)
        missing = [name for name in active if name not in per_replica]
        if missing:
            log.warning("no load figure for %s (not scraped yet?): holding", ", ".join(missing))
        requests = None if missing else sum(per_replica[name] for name in active)
        return Observation(active, standbys, promoted, requests, ttft)

    def _failed(self, kind: str, message: str) -> Decision:
        self.metrics.errors.labels(kind=kind).inc()
        self.metrics.decisions.labels(action="hold").inc()
        log.warning("%s", message)
        return Decision("hold", message)


def run(settings: AutoscaleSettings) -> int:
    """Evaluate every ``interval`` seconds until SIGTERM/SIGINT (or ``max_evaluations``)."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    metrics = AutoscaleMetrics()
    if settings.metrics_port:
        start_http_server(settings.metrics_port, settings.metrics_address, metrics.registry)
    api = haproxy.RuntimeAPI(settings.haproxy_socket)
    log.info(
        "autoscaling %s through %s from %s: scale up above %.1f, down below %.1f requests per "
        "server in rotation%s",
        settings.backend,
        settings.haproxy_socket,
        settings.prometheus_url,
        settings.scale_up_at,
        settings.scale_down_at,
        " (dry run)" if settings.dry_run else "",
    )
    evaluations = 0
    with httpx.Client(base_url=settings.prometheus_url) as client:
        controller = Controller(settings, api, client, metrics)
        while not stop.is_set():
            controller.evaluate()
            evaluations += 1
            if settings.max_evaluations and evaluations >= settings.max_evaluations:
                break
            stop.wait(settings.interval)
    return 0
