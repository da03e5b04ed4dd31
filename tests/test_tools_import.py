"""Every script under tools/ imports (its module level runs: imports from the package
and from sibling tools), so a tool whose helpers moved fails here, not in a user's
hands. All are imported in one fresh interpreter, as `python tools/<name>.py` would
import them, each failure reported by name."""

import json
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"

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


def test_every_tool_imports():
    scripts = sorted(p.stem for p in TOOLS.glob("*.py"))
    assert {"generate", "lm_report", "recurrent_report", "md4_report", "eval_bpc"} <= set(scripts)
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH, str(TOOLS), *scripts],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"tools/{name}.py: {tb}" for name, tb in failures.items())
