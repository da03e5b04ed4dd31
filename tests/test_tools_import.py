"""Every script under tools/, tools/bench/ and tools/reports/ imports (its module level
runs: imports from the package and from sibling tools), so a tool whose helpers moved
fails here, not in a user's hands. Each folder's scripts are imported in one fresh
interpreter, as `python tools/<folder>/<name>.py` would import them (the script's folder
first on sys.path), each failure reported by name."""

import json
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"
FOLDERS = [TOOLS, TOOLS / "bench", TOOLS / "reports"]

IMPORT_EACH = """
import importlib, json, sys, traceback
sys.path.insert(0, sys.argv[1])
failures = {}
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-2)
print(json.dumps(failures))
"""


def scripts_in(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.py"))


def test_every_tool_imports():
    assert {"generate", "eval_bpc", "classify", "sample_images", "eval_dit", "partition"} <= set(
        scripts_in(TOOLS))
    assert {"memory", "throughput", "generate", "estimate_memory"} <= set(scripts_in(TOOLS / "bench"))
    assert {"common", "lm", "md4", "recurrent", "vision"} <= set(scripts_in(TOOLS / "reports"))
    failures = {}
    for folder in FOLDERS:
        proc = subprocess.run(
            [sys.executable, "-c", IMPORT_EACH, str(folder), *scripts_in(folder)],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        found = json.loads(proc.stdout.strip().splitlines()[-1])
        failures |= {f"{folder.relative_to(TOOLS.parent)}/{name}.py": tb for name, tb in found.items()}
    assert not failures, "\n".join(f"{path}: {tb}" for path, tb in failures.items())
