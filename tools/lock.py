"""Rebuild or check constraints.txt, the exact versions a fresh install resolves to.

    python tools/lock.py            # fresh venv: torch first, then .[every extra]; pip freeze
                                    # -> constraints.txt (the README's installs use it with -c)
    python tools/lock.py --check    # every dependency in pyproject.toml is pinned there,
                                    # within its range; exit 1 naming the first that is not

After changing a dependency in pyproject.toml: run the first command, then the suite.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import tomllib
import venv
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "constraints.txt"
TORCH = "torch==2.13.0"  # installed first, so pip takes the CPU wheel, never a CUDA build


def declared_requirements(pyproject: Path = PYPROJECT) -> list[Requirement]:
    """Every direct dependency, the optional extras' included."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        lines.extend(extra)
    return [Requirement(line) for line in lines]


def extras(pyproject: Path = PYPROJECT) -> list[str]:
    return sorted(tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {}))


def locked_versions(lock: Path = LOCK) -> dict[str, Version]:
    pins = {}
    for number, line in enumerate(lock.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if match is None:
            raise ValueError(f"{lock}:{number}: {line!r} is not a 'name==version' pin")
        pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    return pins


def lock_problems(pyproject: Path = PYPROJECT, lock: Path = LOCK) -> list[str]:
    """What is wrong between the declared dependencies and the lock, one line each."""
    if not lock.is_file():
        return [f"{lock} does not exist; run python tools/lock.py"]
    pins, problems = locked_versions(lock), []
    for requirement in declared_requirements(pyproject):
        version = pins.get(canonicalize_name(requirement.name))
        if version is None:
            problems.append(
                f"{pyproject.name}: {requirement} is not pinned in {lock.name}; "
                "run python tools/lock.py"
            )
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(
                f"{lock.name}: {requirement.name}=={version} is outside pyproject.toml's "
                f"range {requirement.specifier}; run python tools/lock.py"
            )
    return problems


def public(pin: str) -> str:
    """'torch==2.13.0+cpu' -> 'torch==2.13.0': a local label would not match another build."""
    return pin.split("+", 1)[0]


def freeze_fresh_install() -> list[str]:
    with tempfile.TemporaryDirectory(prefix="lock-venv-") as env_dir:
        venv.create(env_dir, with_pip=True)
        python = str(Path(env_dir) / "bin" / "python")
        pip = [python, "-m", "pip", "install", "--disable-pip-version-check"]
        everything = f"{ROOT}[{','.join(extras())}]"
        for step in ([TORCH], ["-e", everything]):
            print("lock:", "pip install", *step, flush=True)
            subprocess.run(pip + step, check=True)
        frozen = subprocess.run(
            [python, "-m", "pip", "freeze", "--exclude-editable"],
            check=True, capture_output=True, text=True,
        ).stdout
    return sorted((public(line) for line in frozen.splitlines() if "==" in line), key=str.lower)


def write_lock(pins: list[str]) -> None:
    header = [
        "# Exact versions the test suite passed with: pip install -c constraints.txt ...",
        f"# Made by `python tools/lock.py` on {datetime.date.today()} with Python "
        f"{platform.python_version()} and {TORCH} (CPU), from pyproject.toml with every extra.",
        "# Refresh after changing a dependency: python tools/lock.py, then the suite.",
    ]
    LOCK.write_text("\n".join(header + pins) + "\n")
    print(f"lock: wrote {len(pins)} pins to {LOCK}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="check constraints.txt against pyproject.toml; install nothing")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT, help=argparse.SUPPRESS)
    parser.add_argument("--lock", type=Path, default=LOCK, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.check:
        if sys.version_info[:2] != (3, 11):
            print(f"lock: warning: Python {platform.python_version()}; the project pins 3.11",
                  file=sys.stderr)
        write_lock(freeze_fresh_install())
    try:
        problems = lock_problems(args.pyproject, args.lock)
    except (OSError, ValueError, KeyError, tomllib.TOMLDecodeError) as e:
        problems = [f"cannot read the dependencies: {e}"]
    for line in problems:
        print(f"lock: {line}", file=sys.stderr)
    if not problems:
        print(f"lock: every dependency of {args.pyproject.name} is pinned in {args.lock.name}")
    return 1 if problems else 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
