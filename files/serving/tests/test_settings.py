from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from metalserve.settings import ServeSettings, add_serve_arguments, env_name, settings_from_args


def parse(argv: list[str]) -> ServeSettings:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return settings_from_args(parser.parse_args(argv))


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALSERVE_STORE", "/srv/models")
    monkeypatch.setenv("METALSERVE_MODEL", "llama")
    monkeypatch.setenv("METALSERVE_VERSION", "ABCDEF012345")
    monkeypatch.setenv("METALSERVE_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("METALSERVE_ACCESS_LOG", "false")

    settings = parse(["--max-batch-size", "4", "--device", "cuda:1"])

    assert settings.store == Path("/srv/models")
    assert settings.model == "llama"
    assert settings.version == "abcdef012345"
    assert settings.max_batch_size == 4, "a flag beats the environment"
    assert settings.device == "cuda:1"
    assert settings.access_log is False
    assert settings.port == 8000


def test_every_field_has_a_flag_and_an_env_var() -> None:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    flags = {a.dest: a.option_strings for a in parser._actions if a.dest != "help"}
    for name in ServeSettings.model_fields:
        assert flags[name][0] == "--" + name.replace("_", "-")
        assert env_name(name) == "METALSERVE_" + name.upper()


@pytest.mark.parametrize(
    "argv",
    [
        ["--device", "gpu"],
        ["--port", "70000"],
        ["--max-batch-size", "0"],
        ["--dtype", "int8"],
        ["--drain-timeout", "-1"],
    ],
)
def test_invalid_values(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STORE", "MODEL", "VERSION"):
        monkeypatch.setenv(f"METALSERVE_{name}", "x")
    with pytest.raises(ValidationError):
        parse(argv)


def test_required_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STORE", "MODEL", "VERSION"):
        monkeypatch.delenv(f"METALSERVE_{name}", raising=False)
    with pytest.raises(ValidationError, match="store"):
        parse([])
