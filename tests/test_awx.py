"""awx/: every job template runs a playbook that exists, and every survey asks only for variables
its playbook declares (a validate_argument_spec task's spec) and validates, with answers the
playbook accepts. AWX turns survey answers into extra variables as strings (multiple choice) or
the question's type, which is what these tests feed the specs and the playbooks.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from repo_helpers import BIN, REPO, run_playbook, unreachable_inventory

AWX = REPO / "awx"
SETTINGS = yaml.safe_load((AWX / "job_templates.yml").read_text())
TEMPLATES = SETTINGS["awx_job_templates"]
SURVEY_TYPES = {"text", "textarea", "password", "integer", "float", "multiplechoice", "multiselect"}


def survey(name: str) -> dict[str, Any]:
    return yaml.safe_load((AWX / "surveys" / f"{name}.yml").read_text())


def with_survey() -> list[dict[str, Any]]:
    return [t for t in TEMPLATES if "survey" in t]


def _spec_value(value: Any, play: dict[str, Any], playbook: Path) -> dict[str, Any]:
    """A validate_argument_spec's argument_spec: inline, or '{{ var }}' from the play's vars(_files)."""
    if isinstance(value, dict):
        return value
    match = re.fullmatch(r"\{\{\s*(\w+)\s*\}\}", str(value).strip())
    assert match, f"{playbook.name}: argument_spec must be a mapping or one variable, not {value!r}"
    sources = [play.get("vars") or {}] + [
        yaml.safe_load((playbook.parent / f).read_text()) for f in play.get("vars_files", [])
    ]
    for source in sources:
        if match.group(1) in source:
            return source[match.group(1)]
    raise AssertionError(f"{playbook.name}: {match.group(1)} is not defined in the play's vars or vars_files")


def role_spec(role: str, entry_point: str) -> dict[str, Any]:
    """The options of a role's entry point, which Ansible validates when the role is included."""
    path = REPO / "roles" / role / "meta" / "argument_specs.yml"
    entry = yaml.safe_load(path.read_text())["argument_specs"].get(entry_point) or {}
    return dict(entry.get("options") or {})


def declared_spec(playbook: Path) -> dict[str, Any]:
    """Every option a playbook (and the playbooks it imports) validates: its validate_argument_spec
    tasks, and the argument specs of the role entry points it includes."""
    spec: dict[str, Any] = {}
    for play in yaml.safe_load(playbook.read_text()):
        if "ansible.builtin.import_playbook" in play:
            imported = play["ansible.builtin.import_playbook"]
            if "{{" not in imported:
                spec.update(declared_spec(playbook.parent / imported))
            continue
        for task in play.get("tasks", []) + play.get("pre_tasks", []):
            if "ansible.builtin.validate_argument_spec" in task:
                args = task["ansible.builtin.validate_argument_spec"]
                spec.update(_spec_value(args["argument_spec"], play, playbook))
            included = task.get("ansible.builtin.include_role") or task.get("ansible.builtin.import_role")
            if included:
                spec.update(role_spec(included["name"], included.get("tasks_from", "main")))
    return spec


def answers(question: dict[str, Any]) -> list[Any]:
    """The answers AWX can send for a question that the tests try: each choice, the default."""
    if question["type"] in {"multiplechoice", "multiselect"}:
        return list(question["choices"])
    return [question["default"]] if question.get("default") not in (None, "") else []


def spec_errors(cases: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[list[str]]:
    """Ansible's own argument-spec validation of each (spec, values), in a child process: importing
    ansible.module_utils patches sys.intern, which breaks torch's compiler in this process."""
    program = (
        "import json, sys\n"
        "from ansible.module_utils.common.arg_spec import ArgumentSpecValidator\n"
        "cases = json.load(sys.stdin)\n"
        "print(json.dumps([ArgumentSpecValidator(s).validate(v).error_messages for s, v in cases]))\n"
    )
    result = subprocess.run(
        [str(BIN / "python"), "-c", program], input=json.dumps(cases), capture_output=True, text=True, check=True
    )
    return list(json.loads(result.stdout))


def test_template_names_are_unique() -> None:
    names = [t["name"] for t in TEMPLATES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t["name"])
def test_every_template_playbook_exists(template: dict[str, Any]) -> None:
    playbook = REPO / template["playbook"]
    assert playbook.is_file(), f"{template['name']}: {template['playbook']} does not exist"
    assert template["description"]


def test_the_issue_s_templates_are_all_there() -> None:
    playbooks = {t["playbook"] for t in TEMPLATES}
    for name in (
        "site",
        "deploy",
        "publish_model",
        "rolling_update",
        "rollback",
        "maintenance",
        "verify",
        "verify_gpu",
        "store_gc",
    ):
        assert f"playbooks/{name}.yml" in playbooks


def test_every_survey_file_is_used() -> None:
    used = {t["survey"] for t in with_survey()}
    assert used == {p.stem for p in (AWX / "surveys").glob("*.yml")}


def test_the_inventory_source_is_a_project_inventory() -> None:
    source = REPO / SETTINGS["awx_inventory_path"]
    assert (source / "hosts.yml").is_file() and (source / "group_vars").is_dir()


@pytest.mark.parametrize("template", with_survey(), ids=lambda t: t["name"])
def test_survey_questions_are_well_formed(template: dict[str, Any]) -> None:
    spec = survey(template["survey"])
    assert spec["name"] and "description" in spec and spec["spec"]
    variables = [q["variable"] for q in spec["spec"]]
    assert len(variables) == len(set(variables)), f"{template['survey']}: a variable is asked twice"
    for q in spec["spec"]:
        assert q["question_name"] and re.fullmatch(r"[a-z_][a-z0-9_]*", q["variable"]), q
        assert q["type"] in SURVEY_TYPES, q
        assert isinstance(q["required"], bool), q
        if q["type"] == "multiplechoice":
            assert all(isinstance(c, str) for c in q["choices"]), f"{q['variable']}: AWX sends choices as strings"
            assert q.get("default") in q["choices"], f"{q['variable']}: the default is not a choice"
        if q["type"] in {"text", "textarea"} and "min" in q:
            assert 0 <= q["min"] <= q["max"], q
            default = q.get("default", "")
            assert not default or q["min"] <= len(default) <= q["max"], q
        if q["required"] is False:
            assert q["type"] not in {"multiplechoice"} or "default" in q, q


@pytest.mark.parametrize("template", with_survey(), ids=lambda t: t["name"])
def test_survey_variables_are_declared_and_validated_by_the_playbook(template: dict[str, Any]) -> None:
    spec = declared_spec(REPO / template["playbook"])
    assert spec, f"{template['playbook']} validates no input (no validate_argument_spec task)"
    for q in survey(template["survey"])["spec"]:
        assert q["variable"] in spec, f"{template['playbook']} does not declare the survey variable {q['variable']}"
        option = spec[q["variable"]]
        if q["type"] == "multiplechoice" and "choices" in option:
            assert set(q["choices"]) == set(option["choices"]), f"{q['variable']}: survey and spec choices differ"
        cases = [({q["variable"]: option}, {q["variable"]: answer}) for answer in answers(q)]
        for (_, values), errors in zip(cases, spec_errors(cases), strict=True):
            assert not errors, f"{values}: {errors}"


def test_a_wrong_type_is_refused_by_the_spec() -> None:
    spec = declared_spec(REPO / "playbooks" / "rolling_update.yml")
    [errors] = spec_errors([(spec, {"rollout_canary": "perhaps"})])
    assert errors and "rollout_canary" in errors[0]


# --- the playbooks themselves, fed AWX-shaped answers --------------------------------------


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    return unreachable_inventory(tmp_path)


def survey_answers(name: str, **given: str) -> dict[str, Any]:
    """What AWX sends: each question's default unless answered."""
    values = {q["variable"]: q["default"] for q in survey(name)["spec"] if "default" in q}
    return {**values, **given}


@pytest.mark.parametrize(
    ("playbook", "extra_vars"),
    [
        (
            "rolling_update.yml",
            survey_answers("rolling_update", version_id="8386b9ac7214", rollout_canary="true"),
        ),
        (
            "rolling_update.yml",
            survey_answers("rolling_update", version_id="8386b9ac7214", rollout_serial="50%"),
        ),
        ("rollback.yml", survey_answers("rollback", rollout_strategy="reload")),
        ("maintenance.yml", survey_answers("maintenance", maintenance_reboot="true")),
        ("verify.yml", survey_answers("verify")),
        ("verify.yml", survey_answers("verify", verify_version="8386b9ac7214")),
        ("publish_model.yml", survey_answers("publish_model", model_dir="/srv/incoming/llama")),
    ],
)
def test_survey_answers_pass_the_playbook_checks(inventory: Path, playbook: str, extra_vars: dict[str, Any]) -> None:
    result = run_playbook(f"playbooks/{playbook}", inventory, "--extra-vars", json.dumps(extra_vars))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output  # the hosts do not exist
    assert "UNREACHABLE" in output or "metalserve-test-host.invalid" in output, output
    assert "Validation of arguments failed" not in output, output
    assert "settings are wrong" not in output and "must be" not in output, output


@pytest.mark.parametrize(
    ("playbook", "extra_vars", "named"),
    [
        (
            "rolling_update.yml",
            survey_answers("rolling_update", version_id="8386b9ac7214", rollout_serial="x"),
            "a host count or a percentage (got 'x')",
        ),
        (
            "rolling_update.yml",
            survey_answers("rolling_update", version_id="8386b9ac7214", rollout_canary="maybe"),
            "rollout_canary",
        ),
        ("verify.yml", survey_answers("verify", verify_version="v2"), "verify_version must be a version id"),
        ("publish_model.yml", {}, "missing required arguments: model_dir"),
        ("maintenance.yml", survey_answers("maintenance", maintenance_reboot="later"), "maintenance_reboot"),
    ],
)
def test_bad_answers_are_refused_before_any_host(
    inventory: Path, playbook: str, extra_vars: dict[str, Any], named: str
) -> None:
    result = run_playbook(f"playbooks/{playbook}", inventory, "--extra-vars", json.dumps(extra_vars))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert named in output, output
    assert "UNREACHABLE" not in output, output


# --- awx/configure.yml against the awx.awx modules' documented options ---------------------


def module_options(module: str) -> set[str]:
    """The options (and aliases) awx.awx documents for a module, read from its DOCUMENTATION."""
    import ast

    path = BIN.parent / "lib"
    [source] = list(path.glob(f"python3*/site-packages/ansible_collections/awx/awx/plugins/modules/{module}.py"))
    tree = ast.parse(source.read_text())
    doc = next(
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "DOCUMENTATION" for t in node.targets)
        and isinstance(node.value, ast.Constant)
    )
    options = yaml.safe_load(doc)["options"]
    return set(options) | {alias for option in options.values() for alias in option.get("aliases", [])}


def test_configure_uses_only_options_the_awx_modules_document() -> None:
    tasks = yaml.safe_load((AWX / "configure.yml").read_text())[0]["tasks"]
    used = [
        (key.removeprefix("awx.awx."), args)
        for task in tasks
        for key, args in task.items()
        if key.startswith("awx.awx.")
    ]
    assert {module for module, _ in used} >= {"project", "inventory", "inventory_source", "job_template"}
    for module, args in used:
        unknown = set(args) - module_options(module)
        assert not unknown, f"awx.awx.{module} does not take {sorted(unknown)}"
