"""`python -m tests.probes [--json] [--only PATTERN ...] [--list] [--isolated]`, from the
repository root: run the probes, one verdict line each (runner.py)."""

import sys

from .runner import run

sys.exit(run())
