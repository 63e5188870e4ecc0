"""Role haproxy's configuration in a real HAProxy (the host's): balancing modes, the model a
completion names (404 when unknown) and API keys scoped to models (403 outside their scope).

Three stand-in replicas on loopback answer with their own name; each test renders the role's
templates (configuration, key and scope maps, model list) through Ansible with its settings and
sends requests through the HAProxy that runs them.
"""

from __future__ import annotations

import base64
import collections
import datetime
import hashlib
import hmac
import http.server
import ipaddress
import json
import secrets
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from repo_helpers import BIN, free_port, render_role_templates, run_playbook

MODELS = ["tiny-llama", "big-llama"]
KEYS = [
    {"name": "team-a", "key": "a" * 24},
    {"name": "team-b", "key": "b" * 24},
    {"name": "tiny-only", "key": "t" * 24, "models": ["tiny-llama"]},
    {"name": "operator", "key": "o" * 24, "admin": True},
]
REPLICAS = ["r1", "r2", "r3"]
# The files the role writes, by template, and where the test puts them (role variable).
FILES = {
    "haproxy.cfg.j2": None,
    "api_key_models.map.j2": "__haproxy_scope_map",
    "api_key_limits.map.j2": "__haproxy_limit_map",
    "api_key_quotas.map.j2": "__haproxy_quota_map",
    "models.lst.j2": "__haproxy_models_list",
    "model_backends.map.j2": "__haproxy_backends_map",
    "models.json.j2": "__haproxy_models_json",
    "admin_clients.lst.j2": "__haproxy_admin_clients_list",
    "jwt_scopes.lst.j2": "__haproxy_jwt_scopes_list",
    "jwt_public_key.pem.j2": "__haproxy_jwt_public_key",
}


class StandIn(http.server.BaseHTTPRequestHandler):
    """Answers every GET and POST with the server's name; /slow after a second, /slow?N after N
    seconds (a request in flight)."""

    def do_GET(self) -> None:
        if self.path.startswith("/slow"):
            time.sleep(float(self.path.partition("?")[2] or 1))
        body = self.server.name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("X-Seen-Request-Id", self.headers.get("X-Request-Id", ""))
        if isinstance(self.connection, ssl.SSLSocket):  # mTLS: who the client certificate names
            peer = self.connection.getpeercert() or {}
            subject = dict(pair[0] for pair in peer.get("subject", ()))
            self.send_header("X-Client-Certificate", subject.get("commonName", "none"))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


class StandInServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # HAProxy closing a connection it answered itself (401, 403) is no test failure


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[dict[str, object]]]:
    servers = []
    for name in REPLICAS:
        server = StandInServer(("127.0.0.1", 0), StandIn)
        server.name = name  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield [{"name": s.name, "address": "127.0.0.1", "port": s.server_address[1]} for s in servers]  # type: ignore[attr-defined]
    for server in servers:
        server.shutdown()


class Listeners(NamedTuple):
    http: int
    https: int
    stats: int
    certificate: Path  # HTTPS's, self-signed: the client trusts it alone


def self_signed_pem(path: Path) -> Path:
    """A certificate for 127.0.0.1 and its key, in one PEM file as HAProxy reads it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    return path


def render(dest: Path, replicas: list[dict[str, object]], **settings: object) -> tuple[Path, Listeners]:
    """The role's files with its defaults, these settings, loopback ports and paths under dest;
    returns the configuration and its listeners' ports."""
    listeners = Listeners(free_port(), free_port(), free_port(), self_signed_pem(dest / "tls.pem"))
    digests = (f"{hashlib.sha256(str(k['key']).encode()).hexdigest()} {k['name']}\n" for k in KEYS)
    (dest / "keys.map").write_text("".join(digests))
    overrides = {
        "haproxy_bind_address": "127.0.0.1",
        "haproxy_http_port": listeners.http,
        "haproxy_https_port": listeners.https,
        "haproxy_stats_port": listeners.stats,
        "haproxy_tls_mode": "none",
        "metalserve_replica_mtls": False,  # the stand-ins speak plain HTTP unless a test says
        "__haproxy_tls_pem_path": str(listeners.certificate),
        # Each model's backend has the three stand-ins (unless a test says otherwise).
        "haproxy_backend_servers": [{**replica, "model": model} for model in MODELS for replica in replicas],
        "haproxy_api_keys": KEYS,
        "haproxy_models": MODELS,
        "metalserve_model_name": MODELS[0],  # the default model: servers that name none serve it
        "haproxy_admin_socket": str(dest / "admin.sock"),
        "haproxy_server_state_file": str(dest / "server-state"),
        "__haproxy_key_map": str(dest / "keys.map"),
        **{variable: str(dest / template.removesuffix(".j2")) for template, variable in FILES.items() if variable},
        **settings,
    }
    templates = {name: dest / name.removesuffix(".j2") for name in FILES}
    render_role_templates("haproxy", templates, overrides, dest)
    return dest / "haproxy.cfg", listeners


def get(port: int, path: str = "/", key: str = str(KEYS[0]["key"]), headers: dict[str, str] | None = None) -> str:
    headers = {"Authorization": f"Bearer {key}", **(headers or {})}
    response = httpx.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=10)
    response.raise_for_status()
    return response.text


@pytest.fixture(scope="module")
def haproxy(
    tmp_path_factory: pytest.TempPathFactory, replicas: list[dict[str, object]]
) -> Iterator[Callable[..., Listeners]]:
    """Call with role settings: starts HAProxy on them (once per set of settings in this module)
    and returns its listeners' ports."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(binary).exists():
        pytest.fail("haproxy is not installed: `make deps` installs it (HOST_PACKAGES)")
    processes: list[subprocess.Popen[bytes]] = []
    started: dict[str, Listeners] = {}

    def start(**settings: object) -> Listeners:
        key = json.dumps(settings, sort_keys=True)
        if key in started:
            return started[key]
        config, listeners = render(tmp_path_factory.mktemp("haproxy"), replicas, **settings)
        log = config.with_name("haproxy.log")
        with log.open("wb") as output:  # a file, not a pipe nobody reads: it would fill up
            process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=output, stderr=subprocess.STDOUT)
        processes.append(process)
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{listeners.stats}/metrics", timeout=2).raise_for_status()
                started[key] = listeners
                return listeners
            except httpx.TransportError:
                if process.poll() is not None:
                    raise AssertionError(f"haproxy exited: {log.read_text()}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def test_roundrobin_spreads_requests_evenly(haproxy: Callable[..., Listeners]) -> None:
    port = haproxy(haproxy_balance="roundrobin").http
    counts = collections.Counter(get(port) for _ in range(30))
    assert counts == dict.fromkeys(REPLICAS, 10), counts


def test_hashing_a_header_keeps_each_session_on_one_replica(haproxy: Callable[..., Listeners]) -> None:
    port = haproxy(haproxy_balance="hash", haproxy_hash_on="header", haproxy_hash_header="X-Session-Id").http
    homes = {}
    for session in range(12):
        seen = {get(port, headers={"X-Session-Id": f"session-{session}"}) for _ in range(5)}
        assert len(seen) == 1, (session, seen)
        homes[session] = seen.pop()
    # Different sessions do spread: not everything on one replica.
    assert len(set(homes.values())) >= 2, homes


def test_hashing_the_api_key_keeps_each_key_on_one_replica(haproxy: Callable[..., Listeners]) -> None:
    port = haproxy(haproxy_balance="hash", haproxy_hash_on="api_key").http
    for key in (str(k["key"]) for k in KEYS):
        seen = {get(port, key=key, headers={"X-Session-Id": str(n)}) for n in range(10)}
        assert len(seen) == 1, seen


@pytest.mark.parametrize("factor", [0, 150])
def test_bounded_load_moves_a_hot_key_past_a_busy_replica(haproxy: Callable[..., Listeners], factor: int) -> None:
    """Six requests in flight for one session: without a bound they all queue on its replica;
    with 150 % of the mean as the bound, the surplus goes to the next replicas in the ring."""
    port = haproxy(haproxy_balance="hash", haproxy_hash_on="header", haproxy_hash_balance_factor=factor).http
    with ThreadPoolExecutor(6) as pool:
        served = list(pool.map(lambda _: get(port, "/slow", headers={"X-Session-Id": "hot"}), range(6)))
    if factor == 0:
        assert len(set(served)) == 1, served
    else:
        assert len(set(served)) >= 2, served


def complete(port: int, key: str, body: object) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{port}/v1/completions", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=10
    )


def test_a_completion_for_a_model_not_served_gets_404_from_the_load_balancer(haproxy: Callable[..., Listeners]) -> None:
    port = haproxy(haproxy_models=[*MODELS, "idle-llama"]).http
    key = str(KEYS[0]["key"])
    answer = complete(port, key, {"model": "no-such-model", "prompt": "Hi"})
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["code"] == "model_not_found"
    for model in MODELS:
        assert complete(port, key, {"model": model, "prompt": "Hi"}).text in REPLICAS
    # Served, but no replica of it is up: the load balancer's 503, in OpenAI's JSON too.
    answer = complete(port, key, {"model": "idle-llama", "prompt": "Hi"})
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "no_replica_available"
    # No model to read (not JSON): the replica answers it (its own 4xx).
    assert (
        httpx.post(
            f"http://127.0.0.1:{port}/v1/completions", headers={"Authorization": f"Bearer {key}"}, content=b"{not json"
        ).text
        in REPLICAS
    )


def test_each_model_has_its_backend_and_the_load_balancer_lists_them(
    haproxy: Callable[..., Listeners], replicas: list[dict[str, object]]
) -> None:
    """r1 and r2 serve the default model, r3 the other: a completion reaches only its model's
    replicas, GET /v1/models answers from the load balancer with both (after the key check)."""
    servers = [{**replica, "model": MODELS[replica["name"] == "r3"]} for replica in replicas]
    listeners = haproxy(haproxy_backend_servers=servers, haproxy_balance="roundrobin")
    key = str(KEYS[0]["key"])
    served = {
        model: collections.Counter(
            complete(listeners.http, key, {"model": model, "prompt": "Hi"}).text for _ in range(8)
        )
        for model in MODELS
    }
    assert served == {MODELS[0]: {"r1": 4, "r2": 4}, MODELS[1]: {"r3": 8}}, served
    assert complete(listeners.http, key, {"model": "no-such-model", "prompt": "Hi"}).status_code == 404
    # Not a completion: the default model's replicas.
    assert get(listeners.http, "/version") in ("r1", "r2")
    listed = httpx.get(f"http://127.0.0.1:{listeners.http}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert listed.status_code == 200, listed.text
    assert listed.headers["content-type"] == "application/json"
    assert [card["id"] for card in listed.json()["data"]] == MODELS, listed.text
    assert {card["object"] for card in listed.json()["data"]} == {"model"}
    assert httpx.get(f"http://127.0.0.1:{listeners.http}/v1/models").status_code == 401
    exported = httpx.get(f"http://127.0.0.1:{listeners.stats}/metrics").text
    for model, up in ((MODELS[0], 2), (MODELS[1], 1)):
        assert f'haproxy_backend_active_servers{{proxy="metalserve_{model}"}} {up}' in exported, model


def test_each_model_can_balance_its_own_way(haproxy: Callable[..., Listeners]) -> None:
    """Round robin for the default model, consistent hashing on a header for the other."""
    port = haproxy(
        haproxy_balance="roundrobin",
        haproxy_model_balance={MODELS[1]: {"balance": "hash", "hash_on": "header", "hash_balance_factor": 0}},
    ).http
    key = str(KEYS[0]["key"])

    def served(model: str, session: str) -> str:
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            headers={"Authorization": f"Bearer {key}", "X-Session-Id": session},
            json={"model": model, "prompt": "Hi"},
        )
        return response.text

    assert collections.Counter(served(MODELS[0], "one") for _ in range(9)) == dict.fromkeys(REPLICAS, 3)
    homes = {session: {served(MODELS[1], session) for _ in range(4)} for session in map(str, range(8))}
    assert all(len(home) == 1 for home in homes.values()), homes
    assert len({home.pop() for home in homes.values()}) >= 2, homes


def split_servers(replicas: list[dict[str, object]], variant: str = "b") -> list[dict[str, object]]:
    """r1 and r2 serve the default model's main side, r3 its variant."""
    return [{**r, "model": MODELS[0], "variant": variant if r["name"] == "r3" else ""} for r in replicas]


def post(port: int, key: str, model: str = MODELS[0], headers: dict[str, str] | None = None) -> str:
    response = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        headers={"Authorization": f"Bearer {key}", **(headers or {})},
        json={"model": model, "prompt": "Hi"},
        timeout=10,
    )
    response.raise_for_status()
    return response.text


def test_a_split_sends_its_share_of_a_models_completions_to_the_variant(
    haproxy: Callable[..., Listeners], replicas: list[dict[str, object]]
) -> None:
    """400 completions at random: r3 (the variant) gets the split's share within 10 points (4.6
    standard deviations at 25%), the other model none of them, and each side is a backend of its
    own in the exporter (per-variant series)."""
    percent = 25
    split = {MODELS[0]: {"variant": "b", "percent": percent}}
    listeners = haproxy(
        haproxy_backend_servers=[*split_servers(replicas), {**replicas[0], "model": MODELS[1]}],
        haproxy_balance="roundrobin",
        haproxy_model_splits=split,
    )
    key = str(KEYS[0]["key"])
    with ThreadPoolExecutor(8) as pool:
        served = collections.Counter(pool.map(lambda _: post(listeners.http, key), range(400)))
    assert abs(served["r3"] / 400 - percent / 100) <= 0.10, served
    assert set(served) <= set(REPLICAS), served
    assert {post(listeners.http, key, MODELS[1]) for _ in range(8)} == {"r1"}
    exported = httpx.get(f"http://127.0.0.1:{listeners.stats}/metrics").text
    for backend, up in ((f"metalserve_{MODELS[0]}", 2), (f"metalserve_{MODELS[0]}:b", 1)):
        assert f'haproxy_backend_active_servers{{proxy="{backend}"}} {up}' in exported, backend


def test_a_sticky_split_keeps_each_key_and_each_header_value_on_one_side(
    haproxy: Callable[..., Listeners], replicas: list[dict[str, object]]
) -> None:
    def side(name: str) -> str:
        return "variant" if name == "r3" else "main"

    by_key = haproxy(
        haproxy_backend_servers=split_servers(replicas),
        haproxy_model_splits={MODELS[0]: {"variant": "b", "percent": 50, "sticky": "api_key"}},
    ).http
    for key in ("a" * 24, "b" * 24, "t" * 24):
        assert len({side(post(by_key, key)) for _ in range(10)}) == 1, key
    by_user = haproxy(
        haproxy_backend_servers=split_servers(replicas),
        haproxy_model_splits={MODELS[0]: {"variant": "b", "percent": 50, "sticky": "header", "header": "X-User"}},
    ).http
    key = str(KEYS[0]["key"])
    homes = {u: {side(post(by_user, key, headers={"X-User": f"user-{u}"})) for _ in range(4)} for u in range(40)}
    assert all(len(home) == 1 for home in homes.values()), homes
    on_variant = sum(home == {"variant"} for home in homes.values())
    assert 8 <= on_variant <= 32, homes  # 50% of 40 users, within 3.8 standard deviations
    # Without the header: drawn at random, both sides.
    assert {side(post(by_user, key)) for _ in range(40)} == {"main", "variant"}


def test_a_split_side_with_no_replica_up_leaves_the_other_all_requests(
    haproxy: Callable[..., Listeners], replicas: list[dict[str, object]]
) -> None:
    key = str(KEYS[0]["key"])
    # Variant c has no server: everything stays on the main side.
    port = haproxy(
        haproxy_backend_servers=split_servers(replicas),
        haproxy_model_splits={MODELS[0]: {"variant": "c", "percent": 100}},
    ).http
    assert {post(port, key) for _ in range(12)} <= {"r1", "r2"}
    # The main side has no server: the variant takes everything.
    only_variant = [{**r, "model": MODELS[0], "variant": "b"} for r in replicas[2:]]
    only_variant.append({**replicas[0], "model": MODELS[1]})
    port = haproxy(
        haproxy_backend_servers=only_variant, haproxy_model_splits={MODELS[0]: {"variant": "b", "percent": 10}}
    ).http
    assert {post(port, key) for _ in range(12)} == {"r3"}


@pytest.mark.parametrize(
    ("split", "variant", "refused"),
    [
        ({"variant": "b", "percent": 10, "sticky": "api_key"}, "b", False),
        ({"variant": "b", "percent": 101}, "b", True),
        ({"variant": "b", "percent": 10, "sticky": "cookie"}, "b", True),
        ({"variant": "B!", "percent": 10}, "b", True),
        ({"variant": "b", "percent": 10}, "c", True),  # variant c: no split sends it anything
    ],
)
def test_the_role_checks_its_splits(
    tmp_path: Path, replicas: list[dict[str, object]], split: dict[str, object], variant: str, refused: bool
) -> None:
    """The role's own check (tasks_from check_splits, which its main runs before installing)."""
    playbook = tmp_path / "check_splits.yml"
    tasks = [{"ansible.builtin.include_role": {"name": "haproxy", "tasks_from": "check_splits"}}]
    play = {"hosts": "localhost", "gather_facts": False, "roles": ["metalserve"], "tasks": tasks}
    playbook.write_text(json.dumps([play]))
    settings = {
        "ansible_connection": "local",
        "ansible_python_interpreter": str(BIN / "python"),
        "metalserve_model_name": MODELS[0],
        "haproxy_models": MODELS,
        "haproxy_backend_servers": split_servers(replicas, variant),
        "haproxy_model_splits": {MODELS[0]: split},
    }
    result = run_playbook(str(playbook), "localhost,", "--extra-vars", json.dumps(settings))
    said = " ".join((result.stdout + result.stderr).split())
    assert "TASK [haproxy : Check the A/B splits]" in said, said[-2000:]
    assert (result.returncode != 0) == refused, said[-2000:]
    assert ("haproxy_model_splits must map served models" in said) == refused, said[-2000:]


def test_only_an_admin_key_reads_the_load_balancers_metrics_and_no_replica_admin_api_is_reached(
    haproxy: Callable[..., Listeners],
) -> None:
    port = haproxy().http

    def admin(path: str, key: str, method: str = "GET") -> httpx.Response:
        return httpx.request(method, f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {key}"})

    operator, client = "o" * 24, str(KEYS[0]["key"])
    metrics = admin("/admin/metrics", operator)
    assert metrics.status_code == 200 and "haproxy_process_uptime_seconds" in metrics.text, metrics.text[:200]
    for path, method in (("/admin/metrics", "GET"), ("/admin/reload", "POST")):
        refused = admin(path, client, method)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "admin_not_allowed"
    # Not even an admin key reaches a replica's admin API through the load balancer.
    missing = admin("/admin/reload", operator, "POST")
    assert missing.status_code == 404 and missing.text not in REPLICAS, missing.text
    assert httpx.get(f"http://127.0.0.1:{port}/admin/metrics").status_code == 401


def test_a_key_scoped_to_one_model_gets_403_on_another(haproxy: Callable[..., Listeners]) -> None:
    port = haproxy().http
    scoped = next(str(k["key"]) for k in KEYS if "models" in k)
    assert complete(port, scoped, {"model": "tiny-llama", "prompt": "Hi"}).text in REPLICAS
    refused = complete(port, scoped, {"model": "big-llama", "prompt": "Hi"})
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "model_not_allowed"
    # A scoped key fails closed when the model cannot be read; an unscoped one passes.
    unreadable = {"prompt": "Hi"}
    assert complete(port, scoped, unreadable).status_code == 403
    assert complete(port, str(KEYS[1]["key"]), unreadable).text in REPLICAS
    # A body past HAProxy's 16 KiB buffer: read when the model comes first, else refused.
    long_prompt = "x" * 100_000
    assert complete(port, scoped, {"model": "tiny-llama", "prompt": long_prompt}).text in REPLICAS
    assert complete(port, scoped, {"prompt": long_prompt, "model": "tiny-llama"}).status_code == 403
    # Chat completions are scoped too.
    chat = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        headers={"Authorization": f"Bearer {scoped}"},
        json={"model": "big-llama", "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert chat.status_code == 403, chat.text


SECRET = secrets.token_urlsafe(32)
JWT_SETTINGS = {
    "haproxy_jwt_alg": "HS256",
    "haproxy_jwt_secret": SECRET,
    "haproxy_jwt_issuer": "https://auth.example.test",
    "haproxy_jwt_scopes": [{"name": "tiny-users", "models": ["tiny-llama"]}, {"name": "everyone"}],
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signing_input(alg: str, claims: dict[str, object]) -> str:
    return f"{b64url(json.dumps({'alg': alg, 'typ': 'JWT'}).encode())}.{b64url(json.dumps(claims).encode())}"


def jwt(claims: dict[str, object], secret: str = SECRET, alg: str = "HS256") -> str:
    """A token signed with HMAC-SHA256 (or unsigned, for alg "none")."""
    unsigned = signing_input(alg, claims)
    signature = hmac.new(secret.encode(), unsigned.encode(), hashlib.sha256).digest() if alg != "none" else b""
    return f"{unsigned}.{b64url(signature)}"


def claims(**overrides: object) -> dict[str, object]:
    good = {"sub": "alice", "iss": "https://auth.example.test", "exp": int(time.time()) + 600, "scope": "everyone"}
    return good | overrides


def test_a_valid_jwt_is_accepted_and_its_scope_applies(haproxy: Callable[..., Listeners]) -> None:
    port = haproxy(**JWT_SETTINGS).http
    assert complete(port, jwt(claims()), {"model": "big-llama", "prompt": "Hi"}).text in REPLICAS
    tiny = jwt(claims(scope="tiny-users"))
    assert complete(port, tiny, {"model": "tiny-llama", "prompt": "Hi"}).text in REPLICAS
    refused = complete(port, tiny, {"model": "big-llama", "prompt": "Hi"})
    assert refused.status_code == 403, refused.text
    # API keys still work beside tokens.
    assert complete(port, str(KEYS[0]["key"]), {"model": "big-llama", "prompt": "Hi"}).text in REPLICAS


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(jwt(claims(exp=int(time.time()) - 5)), id="expired"),
        pytest.param(jwt(claims(), secrets.token_urlsafe(32)), id="wrongly-signed"),
        pytest.param(jwt(claims()) + "x", id="tampered-signature"),
        pytest.param(jwt(claims(), alg="none"), id="alg-none"),
        pytest.param(jwt(claims(iss="https://evil.example.test")), id="other-issuer"),
        pytest.param(jwt(claims(scope="admins")), id="undeclared-scope"),
        pytest.param(jwt({k: v for k, v in claims().items() if k != "exp"}), id="no-exp"),
    ],
)
def test_an_invalid_jwt_gets_401(haproxy: Callable[..., Listeners], token: str) -> None:
    port = haproxy(**JWT_SETTINGS).http
    answer = complete(port, token, {"model": "tiny-llama", "prompt": "Hi"})
    assert answer.status_code == 401, answer.text
    assert answer.json()["error"]["code"] == "invalid_api_key"


def test_with_tls_plain_http_is_closed_by_default(haproxy: Callable[..., Listeners]) -> None:
    listeners = haproxy(haproxy_tls_mode="provided")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{listeners.http}/", timeout=3)
    answer = httpx.post(
        f"https://127.0.0.1:{listeners.https}/v1/completions",
        headers={"Authorization": f"Bearer {KEYS[0]['key']}"},
        json={"model": "tiny-llama", "prompt": "Hi"},
        verify=ssl.create_default_context(cafile=listeners.certificate),
    )
    assert answer.text in REPLICAS


def test_plain_http_can_redirect_to_https_before_reading_anything(haproxy: Callable[..., Listeners]) -> None:
    listeners = haproxy(haproxy_tls_mode="provided", haproxy_plain_http="redirect")
    answer = httpx.post(f"http://127.0.0.1:{listeners.http}/v1/completions?x=1", json={"model": "m"})
    assert answer.status_code == 308, answer.text
    assert answer.headers["location"] == f"https://127.0.0.1:{listeners.https}/v1/completions?x=1"


def test_the_load_balancer_gives_every_request_an_id_and_returns_it(haproxy: Callable[..., Listeners]) -> None:
    port = haproxy().http
    answers = [
        httpx.get(f"http://127.0.0.1:{port}/", headers={"Authorization": f"Bearer {KEYS[0]['key']}"}) for _ in range(3)
    ]
    ids = [a.headers["x-request-id"] for a in answers]
    assert len(set(ids)) == 3, ids
    assert [a.headers["x-seen-request-id"] for a in answers] == ids  # the replica got the same
    # A client's own id is replaced; refusals made by HAProxy carry one too.
    forged = httpx.get(
        f"http://127.0.0.1:{port}/", headers={"Authorization": f"Bearer {KEYS[0]['key']}", "X-Request-Id": "mine"}
    )
    assert forged.headers["x-seen-request-id"] == forged.headers["x-request-id"] != "mine"
    refused = httpx.get(f"http://127.0.0.1:{port}/")
    assert refused.status_code == 401
    assert refused.headers["x-request-id"] not in ("", *ids)


def es256_jwt(claims: dict[str, object], key: ec.EllipticCurvePrivateKey) -> str:
    """A token signed with ECDSA P-256 (JWS wants r and s side by side, not DER)."""
    unsigned = signing_input("ES256", claims)
    r, s = utils.decode_dss_signature(key.sign(unsigned.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{unsigned}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def test_an_es256_jwt_is_verified_with_the_public_key(haproxy: Callable[..., Listeners]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    settings = {**JWT_SETTINGS, "haproxy_jwt_alg": "ES256", "haproxy_jwt_public_key": public_pem.decode()}
    port = haproxy(**settings).http
    body = {"model": "tiny-llama", "prompt": "Hi"}
    assert complete(port, es256_jwt(claims(), key), body).text in REPLICAS
    forged = complete(port, es256_jwt(claims(), ec.generate_private_key(ec.SECP256R1())), body)
    assert forged.status_code == 401, forged.text
    # A token that names another algorithm (HS256 here) is refused whatever its signature.
    assert complete(port, jwt(claims()), body).status_code == 401


class Pki:
    """A CA issuing certificates as role cluster_pki does (serverAuth and clientAuth, 127.0.0.1)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        ca = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca = directory / f"{name}.crt"
        self.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def issue(self, common_name: str) -> Path:
        """The certificate and its key in one PEM file (as HAProxy's crt and ssl's load_cert_chain read it)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        loopback = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(loopback, critical=False)
            .add_extension(usage, critical=False)
            .sign(self.key, hashes.SHA256())
        )
        path = self.directory / f"{common_name}.pem"
        path.write_bytes(
            certificate.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return path


@pytest.fixture(scope="module")
def mtls_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pki, list[dict[str, object]]]]:
    """Stand-in replicas that require a client certificate: "good" from the cluster CA with a
    certificate of it; "stranger" with another CA's certificate; "picky" trusting only clients
    of another CA."""
    directory = tmp_path_factory.mktemp("mtls")
    cluster, other = Pki(directory, "cluster-ca"), Pki(directory, "other-ca")
    setups = {"good": (cluster, cluster), "stranger": (other, cluster), "picky": (cluster, other)}
    servers = []
    for name, (issuer, trusted) in setups.items():
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(issuer.issue(name))
        context.load_verify_locations(cafile=trusted.ca)
        context.verify_mode = ssl.CERT_REQUIRED
        server = StandInServer(("127.0.0.1", 0), StandIn)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.name = name  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield cluster, [{"name": s.name, "address": "127.0.0.1", "port": s.server_address[1]} for s in servers]  # type: ignore[attr-defined]
    for server in servers:
        server.shutdown()


def test_mutual_tls_to_the_replicas(
    haproxy: Callable[..., Listeners], mtls_replicas: tuple[Pki, list[dict[str, object]]]
) -> None:
    """With metalserve_replica_mtls HAProxy presents its certificate (health checks too) and
    checks the replica's: only the replica whose certificate is the cluster CA's and which
    trusts the load balancer's gets traffic; the other two stay down."""
    cluster, servers = mtls_replicas
    listeners = haproxy(
        haproxy_backend_servers=servers,
        haproxy_balance="roundrobin",
        haproxy_health_interval="200ms",
        metalserve_replica_mtls=True,
        metalserve_ca_cert=str(cluster.ca),
        __haproxy_replica_client_pem=str(cluster.issue("lb1")),
    )
    url, auth = f"http://127.0.0.1:{listeners.http}/", {"Authorization": f"Bearer {KEYS[0]['key']}"}
    deadline = time.monotonic() + 10
    while httpx.get(url, headers=auth, timeout=5).status_code != 200:  # the checks' rise at start
        assert time.monotonic() < deadline, "no replica came up over mTLS"
        time.sleep(0.2)
    seen: collections.Counter[tuple[str, str]] = collections.Counter()
    for _ in range(12):
        response = httpx.get(url, headers=auth, timeout=5)
        assert response.status_code == 200, response.text
        seen[(response.text, response.headers["X-Client-Certificate"])] += 1
    assert seen == {("good", "lb1"): 12}, seen


@pytest.mark.parametrize("mode", ["required", "optional"])
def test_client_certificates_at_the_load_balancer(haproxy: Callable[..., Listeners], tmp_path: Path, mode: str) -> None:
    """haproxy_client_certificates: required refuses a client without a certificate from the CA
    in the handshake; optional lets one without through; either refuses another CA's."""
    clients, other = Pki(tmp_path, f"clients-{mode}"), Pki(tmp_path, f"other-{mode}")
    listeners = haproxy(
        haproxy_tls_mode="provided",
        haproxy_client_certificates=mode,
        __haproxy_client_ca_path=str(clients.ca),
    )
    url, auth = f"https://127.0.0.1:{listeners.https}/", {"Authorization": f"Bearer {KEYS[0]['key']}"}

    def context(certificate: Path | None) -> ssl.SSLContext:
        trusted = ssl.create_default_context(cafile=listeners.certificate)
        if certificate is not None:
            trusted.load_cert_chain(certificate)
        return trusted

    answer = httpx.get(url, headers=auth, verify=context(clients.issue("alice")), timeout=5)
    assert answer.text in REPLICAS
    with pytest.raises(httpx.TransportError):
        httpx.get(url, headers=auth, verify=context(other.issue("mallory")), timeout=5)
    if mode == "required":
        with pytest.raises(httpx.TransportError):
            httpx.get(url, headers=auth, verify=context(None), timeout=5)
    else:
        assert httpx.get(url, headers=auth, verify=context(None), timeout=5).text in REPLICAS
    log = listeners.certificate.with_name("haproxy.log")
    deadline = time.monotonic() + 5
    while 'cert="alice"' not in log.read_text():  # logged at the request's end
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def test_a_key_with_a_quota_gets_429_once_it_is_used_up(haproxy: Callable[..., Listeners]) -> None:
    """A quota counts a key's requests over 24 hours (sliding), past its 10 s rate limit: the
    fourth request of a key with quota 3 gets OpenAI's insufficient_quota; others go on."""
    metered = [{**k, "quota": 3} if k["name"] == "team-b" else k for k in KEYS]
    port = haproxy(haproxy_api_keys=metered).http
    answers = [complete(port, str(KEYS[1]["key"]), {"model": "tiny-llama", "prompt": "Hi"}) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429], [a.text for a in answers]
    assert answers[-1].json()["error"]["code"] == "insufficient_quota"
    assert complete(port, str(KEYS[0]["key"]), {"model": "tiny-llama", "prompt": "Hi"}).status_code == 200


def runtime_api(listeners: Listeners, command: str) -> str:
    """One command on the HAProxy's admin socket (next to its files)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(str(listeners.certificate.with_name("admin.sock")))
        client.sendall(command.encode() + b"\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    return answer.decode()


def test_two_load_balancers_share_rate_limits_over_tls_peers(
    haproxy: Callable[..., Listeners], mtls_replicas: tuple[Pki, list[dict[str, object]]]
) -> None:
    """With two peers (haproxy_peers) a key's requests through one load balancer count at the
    other: team-b (3 per 10 s) uses its three on lb-a, and its next request on lb-b gets 429.
    The peers speak TLS with the cluster CA's certificates both ways, as the lab's do."""
    cluster, servers = mtls_replicas
    ports = {"lb-a": free_port(), "lb-b": free_port()}
    peers = [{"name": name, "address": "127.0.0.1", "port": port} for name, port in ports.items()]
    limited = [{**k, "rate_limit": 3} if k["name"] == "team-b" else k for k in KEYS]
    started = {
        name: haproxy(
            haproxy_backend_servers=servers,
            haproxy_health_interval="200ms",
            haproxy_api_keys=limited,
            haproxy_peers=peers,
            haproxy_peer_name=name,
            metalserve_replica_mtls=True,
            metalserve_ca_cert=str(cluster.ca),
            __haproxy_replica_client_pem=str(cluster.issue(name)),
        )
        for name in ports
    }
    deadline = time.monotonic() + 10
    while "ESTA" not in runtime_api(started["lb-a"], "show peers"):
        assert time.monotonic() < deadline, runtime_api(started["lb-a"], "show peers")
        time.sleep(0.2)
    key, body = str(KEYS[1]["key"]), {"model": "tiny-llama", "prompt": "Hi"}
    for name, listeners in started.items():  # both reach the replica (the checks' rise at start)
        while complete(listeners.http, str(KEYS[0]["key"]), body).status_code != 200:
            assert time.monotonic() < deadline, f"{name}: no replica came up over mTLS"
            time.sleep(0.2)
    answers = [complete(started["lb-a"].http, key, body).status_code for _ in range(3)]
    assert answers == [200, 200, 200], answers
    while "http_req_rate(10000)=3" not in runtime_api(started["lb-b"], "show table per_key_rate"):
        assert time.monotonic() < deadline, runtime_api(started["lb-b"], "show table per_key_rate")
        time.sleep(0.1)
    refused = complete(started["lb-b"].http, key, body)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"


def test_lb_drain_waits_for_requests_in_flight_fails_or_cuts_on_time_and_enables(
    haproxy: Callable[..., Listeners], tmp_path: Path
) -> None:
    """Role lb_drain on a real HAProxy (tests/fixtures/lb_drain/drain.yml): a drain waits for a
    4 s request and leaves the server in maintenance without cutting it, saved in the
    server-state file a restarted HAProxy loads; with 2 s for a 20 s
    request it fails naming the server and lb_drain_cut_sessions, and with that set cuts it; a
    DOWN server drains at once; enable waits until the server is UP, and saves that."""
    if shutil.which("socat") is None:
        pytest.fail("socat is not installed: `make deps` installs it (HOST_PACKAGES)")
    server = StandInServer(("127.0.0.1", 0), StandIn)
    server.name = "up"  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        servers = [
            {"name": "up", "address": "127.0.0.1", "port": server.server_address[1]},
            {"name": "down", "address": "127.0.0.1", "port": free_port()},  # nobody listens
        ]
        # slowstart: a server is STARTING (not UP) for that long after its enable.
        listeners = haproxy(haproxy_backend_servers=servers, haproxy_health_interval="500ms", haproxy_slowstart="1s")
        settings = {
            "ansible_connection": "local",
            "ansible_python_interpreter": str(BIN / "python"),
            "lb_http_port": listeners.http,
            "lb_key": str(KEYS[0]["key"]),
            "lb_drain_loadbalancers": ["localhost"],
            "lb_drain_socket": str(listeners.certificate.with_name("admin.sock")),
            "lb_drain_state_file": str(listeners.certificate.with_name("server-state")),
            "lb_drain_backend": f"metalserve_{MODELS[0]}",
            "lb_drain_up_timeout": 20,
        }
        result = run_playbook("tests/fixtures/lb_drain/drain.yml", "localhost,", "--extra-vars", json.dumps(settings))
        said = result.stdout + result.stderr
        assert result.returncode == 0, said[-4000:]
        assert "TASK [Assert the client saw the cut, long before the 20 s]" in said, said[-4000:]
    finally:
        server.shutdown()
