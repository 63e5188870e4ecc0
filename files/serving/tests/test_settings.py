from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import Field, ValidationError

from metalserve.flags import (
    Arg,
    CommandSettings,
    add_arguments,
    add_command,
    settings_from_args,
)
from metalserve.settings import (
    MakeTinyModelSettings,
    PublishSettings,
    ServeSettings,
    env_name,
)


def parse(argv: list[str]) -> ServeSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser, ServeSettings)
    return settings_from_args(ServeSettings, parser.parse_args(argv))


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
    add_arguments(parser, ServeSettings)
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
        ["--max-context", "31"],  # not even a prompt and a few tokens
        ["--dtype", "int8"],
        ["--drain-timeout", "-1"],
        ["--request-timeout", "0"],
        ["--port", "9000", "--metrics-port", "9000"],
        ["--tensor-parallel", "9"],
        ["--prefix-cache-tokens", "15"],  # less than one block
        ["--prefix-cache-tokens", "-1"],
        # Tensor parallelism: rank N on cuda:N, the static path, graphs on CUDA only.
        ["--tensor-parallel", "2", "--device", "cuda:1"],
        ["--tensor-parallel", "2", "--decode-mode", "cuda-graphs"],
        ["--tensor-parallel", "2", "--decode-mode", "dynamic"],
    ],
)
def test_invalid_values(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STORE", "MODEL", "VERSION"):
        monkeypatch.setenv(f"METALSERVE_{name}", "x")
    with pytest.raises(ValidationError):
        parse(argv)


@pytest.mark.parametrize(
    ("argv", "env", "uses"),
    [
        ([], None, False),  # the CPU: one process
        (["--device", "cuda"], None, True),  # CUDA, one rank: the engine's own process
        (["--device", "cuda:1"], None, True),
        (["--device", "cuda", "--tensor-parallel", "2"], None, False),  # ranks: the thread
        (["--device", "cuda", "--no-engine-process"], None, False),
        (["--device", "cuda"], "false", False),
        (["--engine-process"], None, True),
        ([], "true", True),
        (["--no-engine-process"], "true", False),  # a flag beats the environment
    ],
)
def test_the_engine_process_is_the_default_on_cuda_with_one_rank(
    argv: list[str], env: str | None, uses: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("STORE", "MODEL", "VERSION"):
        monkeypatch.setenv(f"METALSERVE_{name}", "x")
    if env is not None:
        monkeypatch.setenv("METALSERVE_ENGINE_PROCESS", env)
    assert parse(argv).uses_engine_process is uses


def test_an_engine_process_asked_for_ranks_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STORE", "MODEL", "VERSION"):
        monkeypatch.setenv(f"METALSERVE_{name}", "x")
    with pytest.raises(ValidationError, match="engine_process takes one rank"):
        parse(["--device", "cuda", "--tensor-parallel", "2", "--engine-process"])


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--device", "cpu"], "engine_process must be on"),
        (["--device", "cuda", "--no-engine-process"], "engine_process must be on"),
        (["--device", "cuda", "--tensor-parallel", "2"], "engine_process must be on"),
        (["--device", "cuda", "--api-processes", "33"], "less than or equal to 32"),
    ],
)
def test_api_processes_need_the_engine_process(
    argv: list[str], error: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("STORE", "MODEL", "VERSION"):
        monkeypatch.setenv(f"METALSERVE_{name}", "x")
    if "--api-processes" not in argv:
        argv = [*argv, "--api-processes", "2"]
    with pytest.raises(ValidationError, match=error):
        parse(argv)
    assert parse(["--device", "cuda", "--api-processes", "4"]).api_processes == 4
    assert parse(["--device", "cpu", "--engine-process", "--api-processes", "2"]).api_processes == 2


def test_required_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STORE", "MODEL", "VERSION"):
        monkeypatch.delenv(f"METALSERVE_{name}", raising=False)
    with pytest.raises(ValidationError, match="store"):
        parse([])


# --- command models (every other command) ---------------------------------------------------


class Example(CommandSettings):
    """Every kind of field the bridge knows."""

    paths: Annotated[list[Path], Arg(positional=True, nargs="+", metavar="PATH")] = Field(
        description="paths"
    )
    count: Annotated[int, Arg(env="METALSERVE_TEST_COUNT")] = Field(
        3, ge=1, description="how many (default: %(default)s, 100% sure)"
    )
    mode: Literal["fast", "slow"] = Field("fast", description="speed")
    level: Annotated[int, Arg(choices=(1, 2))] = 1
    word: Annotated[str, Arg(flag="--say", metavar="WORD")] = Field(description="a word")
    tags: Annotated[tuple[str, ...], Arg(flag="--tag", append=True)] = ()
    left: Annotated[bool, Arg(group="side")] = False
    right: Annotated[bool, Arg(group="side")] = False
    secret: Annotated[str, Arg(cli=False)] = "code only"


def example_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="example")
    add_command(parser.add_subparsers(), "run", Example, lambda settings: settings)
    return parser


def run(argv: list[str]) -> Example:
    args = example_parser().parse_args(["run", *argv])
    result: Example = args.handler(args)
    return result


def test_command_model_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("METALSERVE_TEST_COUNT", raising=False)
    settings = run(["a", "b", "--say", "hi", "--tag", "x", "--tag", "y", "--level", "2"])
    assert settings.paths == [Path("a"), Path("b")]
    assert settings.word == "hi"
    assert settings.tags == ("x", "y")
    assert (settings.count, settings.mode, settings.level) == (3, "fast", 2)
    assert (settings.left, settings.right, settings.secret) == (False, False, "code only")
    assert run(["a", "--say", "x", "--right"]).right is True


def test_command_model_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALSERVE_TEST_COUNT", "7")
    monkeypatch.setenv("METALSERVE_MODE", "slow")  # no Arg(env=...): never read
    assert run(["a", "--say", "x"]).count == 7
    assert run(["a", "--say", "x", "--count", "9"]).count == 9, "a flag beats the environment"
    assert run(["a", "--say", "x"]).mode == "fast"


def test_command_model_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        example_parser().parse_args(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "usage: example run [-h] [--count COUNT] [--mode {fast,slow}] [--level {1,2}]" in text
    assert "--say WORD [--tag TAGS] [--left | --right] PATH [PATH ...]" in text
    assert "how many (default: 3, 100% sure)" in text
    assert "secret" not in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["a"], "the following arguments are required: --say"),
        (["a", "--say", "x", "--count", "many"], "argument --count: invalid int value: 'many'"),
        (["a", "--say", "x", "--mode", "warp"], "argument --mode: invalid choice: 'warp'"),
        (["a", "--say", "x", "--level", "3"], "argument --level: invalid choice: 3"),
        (["a", "--say", "x", "--left", "--right"], "argument --right: not allowed with"),
        # argparse takes it; the model refuses it: the same form, naming the flag.
        (["a", "--say", "x", "--count", "0"], "argument --count: Input should be greater than"),
    ],
)
def test_command_model_errors_exit_2_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        run(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: example run")
    assert f"example run: error: {message}" in err


def test_store_flags_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALSERVE_STORE", "/srv/models")
    monkeypatch.setenv("METALSERVE_MODEL", "llama")
    monkeypatch.setenv("METALSERVE_MANIFEST_FORMAT", "1")  # not a variable of publish
    parser = argparse.ArgumentParser()
    add_arguments(parser, PublishSettings)
    settings = settings_from_args(PublishSettings, parser.parse_args(["src", "--model", "m"]))
    assert settings == PublishSettings(src_dir=Path("src"), store=Path("/srv/models"), model="m")
    assert settings.manifest_format == 3
    for action in parser._actions:
        assert not action.required or action.dest == "src_dir"


def test_store_flags_are_required_without_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("METALSERVE_STORE", raising=False)
    monkeypatch.setenv("METALSERVE_MODEL", "")  # empty: as if unset
    parser = argparse.ArgumentParser(prog="publish")
    add_arguments(parser, PublishSettings)
    with pytest.raises(SystemExit):
        parser.parse_args(["src"])
    assert "the following arguments are required: --store, --model" in capsys.readouterr().err


def test_other_commands_read_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALSERVE_SEED", "5")
    monkeypatch.setenv("METALSERVE_OUT_DIR", "/elsewhere")
    settings = MakeTinyModelSettings(out_dir=Path("out"))
    assert (settings.out_dir, settings.seed) == (Path("out"), 0)
