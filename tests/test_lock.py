"""constraints.txt pins every dependency pyproject.toml declares, within its range, and
the environment the suite runs in is the locked one (what a newcomer installs)."""

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK_TOOL = ROOT / "tools" / "lock.py"


def check(pyproject: Path, lock: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(LOCK_TOOL), "--check", "--pyproject", str(pyproject), "--lock", str(lock)],
        capture_output=True, text=True, timeout=60,
    )


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_every_declared_dependency_is_pinned_within_its_range():
    result = check(ROOT / "pyproject.toml", ROOT / "constraints.txt")
    assert result.returncode == 0, result.stderr


def test_a_dependency_the_lock_does_not_pin_fails_the_check(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    text = (ROOT / "pyproject.toml").read_text()
    pyproject.write_text(text.replace('"torchtitan==0.2.2",', '"torchtitan==0.2.2",\n    "rich>=13",', 1))
    result = check(pyproject, ROOT / "constraints.txt")
    assert result.returncode == 1
    assert "rich>=13 is not pinned in constraints.txt" in result.stderr


def test_a_pin_outside_the_declared_range_fails_the_check(tmp_path):
    lock = tmp_path / "constraints.txt"
    lines = [
        "pytest==7.4.0" if line.startswith("pytest==") else line
        for line in (ROOT / "constraints.txt").read_text().splitlines()
    ]
    lock.write_text("\n".join(lines) + "\n")
    result = check(ROOT / "pyproject.toml", lock)
    assert result.returncode == 1
    assert "pytest==7.4.0 is outside pyproject.toml's range" in result.stderr


def test_a_malformed_lock_line_is_one_clear_line(tmp_path):
    lock = tmp_path / "constraints.txt"
    lock.write_text("torch>=2\n")
    result = check(ROOT / "pyproject.toml", lock)
    assert result.returncode == 1
    assert "'torch>=2' is not a 'name==version' pin" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["torch", "torchtitan", "pytest", "datasets", "torchdata"])
def test_the_suite_runs_in_the_locked_environment(name):
    """CI installs with -c constraints.txt into a fresh venv: what runs is what is locked."""
    installed = Version(metadata.version(name)).public
    assert installed == locked()[name], (
        f"{name} {installed} is installed, constraints.txt pins {locked()[name]}: install with "
        "pip install -c constraints.txt -e \".[test]\""
    )


def test_every_pyproject_requirement_parses():
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        assert Requirement(line).specifier, f"{line}: give it a range"
