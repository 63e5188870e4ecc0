"""The console script, run as a subprocess like Ansible runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import METALSERVE, MODEL, Store, free_port, run_cli, server_env
from metalserve import store
from metalserve.exitcodes import ExitCode


def test_make_tiny_model_matches_the_library(tmp_path: Path, model_dirs: dict[int, Path]) -> None:
    result = run_cli("make-tiny-model", str(tmp_path / "out"), "--seed", "1")
    assert result.returncode == 0, result.stderr
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (model_dirs[1] / name).read_bytes(), name


def test_publish_prints_the_version_id_last(tmp_path: Path, model_dirs: dict[int, Path]) -> None:
    store_dir = tmp_path / "store"
    first = run_cli("publish", str(model_dirs[1]), "--store", str(store_dir), "--model", MODEL)
    assert first.returncode == 0, first.stderr
    version_id = first.stdout.strip().splitlines()[-1]
    assert len(version_id) == 64
    assert (store_dir / MODEL / "versions" / version_id / "manifest.json").is_file()
    assert f"published: {MODEL} {version_id}" in first.stderr

    # Same content again (store and model from the environment this time): same id.
    env = {**os.environ, "METALSERVE_STORE": str(store_dir), "METALSERVE_MODEL": MODEL}
    again = subprocess.run(
        [METALSERVE, "publish", str(model_dirs[1])],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == version_id
    assert f"already published: {MODEL} {version_id}" in again.stderr

    # Format 1 (no block digests): what releases before format 2 wrote, with their ids.
    old = run_cli(
        "publish",
        str(model_dirs[1]),
        "--store",
        str(store_dir),
        "--model",
        MODEL,
        "--manifest-format",
        "1",
    )
    assert old.returncode == 0, old.stderr
    old_id = old.stdout.strip().splitlines()[-1]
    assert old_id != version_id
    manifest = json.loads((store_dir / MODEL / "versions" / old_id / "manifest.json").read_text())
    assert manifest["format"] == 1
    assert (
        run_cli(
            "verify", "--store", str(store_dir), "--model", MODEL, "--version", old_id
        ).returncode
        == 0
    )
    bad = run_cli(
        "publish", str(model_dirs[1]), "--store", str(store_dir), "--manifest-format", "3"
    )
    assert bad.returncode == 2
    assert "--manifest-format" in bad.stderr


def test_verify_and_resolve(model_store: Store) -> None:
    args = ("--store", str(model_store.root), "--model", MODEL)
    ok = run_cli("verify", *args, "--version", model_store.v1[:12])
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == model_store.v1

    resolved = run_cli("resolve", *args, "--version", model_store.v2[:16])
    assert resolved.returncode == 0
    assert resolved.stdout.strip() == model_store.v2

    bad = run_cli("verify", *args, "--version", model_store.corrupt)
    assert bad.returncode == ExitCode.VERIFICATION_FAILED
    assert "model.safetensors" in bad.stderr

    for ref, message in [("0" * 64, "no version"), (model_store.v1[:8], "too short")]:
        unknown = run_cli("verify", *args, "--version", ref)
        assert unknown.returncode == ExitCode.VERSION_NOT_FOUND
        assert message in unknown.stderr


def test_verify_names_missing_and_extra_files(tmp_path: Path, model_store: Store) -> None:
    root = tmp_path / "store"
    shutil.copytree(model_store.root, root)
    vdir = root / MODEL / "versions" / model_store.v1
    vdir.chmod(0o755)
    (vdir / "tokenizer.json").unlink()
    (vdir / "notes.txt").write_text("hello")
    result = run_cli("verify", "--store", str(root), "--model", MODEL, "--version", model_store.v1)
    assert result.returncode == ExitCode.VERIFICATION_FAILED
    assert "tokenizer.json: missing" in result.stderr
    assert "notes.txt: extra" in result.stderr


@pytest.mark.parametrize("split", [(), ("--engine-process",)], ids=["thread", "engine-process"])
def test_serve_refuses_a_tampered_version(
    model_store: Store, tmp_path: Path, split: tuple[str, ...]
) -> None:
    """With the engine in its own process, its VerificationError reaches the API's exit code."""
    proc = subprocess.run(
        [
            METALSERVE,
            "serve",
            "--store",
            str(model_store.root),
            "--model",
            MODEL,
            "--version",
            model_store.corrupt,
            "--port",
            str(free_port()),
            *split,
        ],
        capture_output=True,
        text=True,
        env=server_env(),
        timeout=120,
        check=False,
    )
    assert proc.returncode == ExitCode.VERIFICATION_FAILED, proc.stderr[-2000:]
    assert "model.safetensors" in proc.stderr
    assert "failed verification" in proc.stderr


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        (["--version", "f" * 64], {}, ExitCode.VERSION_NOT_FOUND, "no version"),
        (["--device", "tpu"], {}, ExitCode.USAGE, "device"),
        ([], {"METALSERVE_MAX_BATCH_SIZE": "many"}, ExitCode.USAGE, "max_batch_size"),
        (["--admin-token-file", "/nonexistent/token"], {}, ExitCode.USAGE, "token"),
    ],
)
def test_serve_fails_fast_on_bad_settings(
    model_store: Store, args: list[str], env: dict[str, str], code: int, message: str
) -> None:
    base = ["--store", str(model_store.root), "--model", MODEL, "--version", model_store.v1]
    proc = subprocess.run(
        [METALSERVE, "serve", *base, *args],
        capture_output=True,
        text=True,
        env={**server_env(), **env},
        timeout=60,
        check=False,
    )
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr


def test_serve_help_names_every_environment_variable() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for name in (
        "METALSERVE_STORE",
        "METALSERVE_MAX_BATCH_SIZE",
        "METALSERVE_DRAIN_TIMEOUT",
        "METALSERVE_ADMIN_TOKEN_FILE",
        "METALSERVE_DEVICE",
    ):
        assert name in result.stdout


def test_store_commands_need_no_serving_stack(tmp_path: Path, model_dirs: dict[int, Path]) -> None:
    """Store hosts and load balancers install the CLI without torch, FastAPI or transformers."""
    blocked = ["torch", "transformers", "fastapi", "uvicorn", "safetensors", "prometheus_client"]
    program = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None  # any import of them now fails\n"
        "from metalserve.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    store_dir = str(tmp_path / "store")
    for command in (
        ["publish", str(model_dirs[1]), "--store", store_dir, "--model", MODEL],
        ["resolve", "--store", store_dir, "--model", MODEL, "--version", "0" * 12],
    ):
        result = subprocess.run(
            [sys.executable, "-c", program, *command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "ModuleNotFoundError" not in result.stderr, result.stderr
        assert "import of" not in result.stderr, result.stderr
    published = store.list_versions(Path(store_dir), MODEL)
    assert published, "publish without the serving stack published nothing"


def test_product_commands_never_import_the_benchmarks(
    tmp_path: Path, model_dirs: dict[int, Path]
) -> None:
    """metalserve.bench (load generator, benchmarks) is imported only by load and bench."""
    program = (
        "import sys\n"
        "sys.modules['metalserve.bench'] = None  # any import of it now fails\n"
        "from metalserve.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    store_dir = str(tmp_path / "store")
    for command in (
        ["--help"],
        ["serve", "--help"],
        ["publish", str(model_dirs[1]), "--store", store_dir, "--model", MODEL],
        ["resolve", "--store", store_dir, "--model", MODEL, "--version", "0" * 12],
        ["consistency", "--help"],
    ):
        result = subprocess.run(
            [sys.executable, "-c", program, *command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode in (0, ExitCode.VERSION_NOT_FOUND), (command, result.stderr)
    assert store.list_versions(Path(store_dir), MODEL)
    blocked = subprocess.run(
        [sys.executable, "-c", program, "bench", "load", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "import of metalserve.bench halted" in blocked.stderr  # the block works


def test_top_level_help_lists_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in (
        "make-tiny-model", "publish", "verify", "resolve", "serve", "consistency", "load", "bench",
    ):  # fmt: skip
        assert command in result.stdout
