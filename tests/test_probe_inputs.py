"""tests/probes: every bad input in its list ends in one clear error line, and its
verdicts are right (a traceback, exit 0, a hang, several error lines or the wrong error
are FAIL)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from probes import cases, runner


def test_every_probe_ends_in_one_error_line():
    """The whole list (about 130 probes, forked from one preloaded process: about 1 s
    each on a loaded 2-core machine), as `python -m tests.probes --json` prints it."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.probes", "--json", "--timeout", "120"],
        capture_output=True, text=True, timeout=1200, cwd=REPO,
    )
    outcomes = json.loads(proc.stdout)
    assert [o["name"] for o in outcomes] == [p.name for p in cases.PROBES]
    failed = [f"{o['name']}: {o['reason']} | {o['error_line']}" for o in outcomes if o["verdict"] != "PASS"]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0
    assert len(outcomes) >= 40 and len({o["name"] for o in outcomes}) == len(outcomes)


def test_probe_names_are_unique_and_every_entry_point_is_probed():
    names = [p.name for p in cases.PROBES]
    assert len(names) == len(set(names))
    assert {p.entry for p in cases.PROBES} == set(cases.ENTRY_POINTS)


EXPECTING_BOOM = cases.probe("x", "train", expect="boom")


@pytest.mark.parametrize("returncode,output,timed_out,verdict,reason", [
    (2, "[titan] INFO loading\nerror: boom in the config\n", False, "PASS", "one-line error"),
    (2, "usage: x.py [-h]\nx.py: error: argument --n: boom\n", False, "PASS", "one-line error"),
    (1, "Traceback (most recent call last):\n  File x\nValueError: boom\nerror: boom\n", False,
     "FAIL", "traceback: ValueError: boom"),
    (0, "error: boom\n", False, "FAIL", "exit 0"),
    (0, "all fine\n", False, "FAIL", "exit 0"),
    (None, "error: boom\n", True, "FAIL", "hang: killed after the timeout"),
    (2, "error: boom\nerror: boom again\n", False, "FAIL", "2 error lines"),
    (2, "something broke\n", False, "FAIL", "exit 2 without an error line"),
    (-9, "", False, "FAIL", "exit -9 without an error line"),
    (2, "error: bust\n", False, "FAIL", "error line lacks ['boom']"),
])
def test_verdicts(returncode, output, timed_out, verdict, reason):
    got, got_reason, _ = runner.judge(EXPECTING_BOOM, returncode, output, timed_out)
    assert got == verdict and got_reason.startswith(reason)


def test_expected_fragments_do_not_match_inside_the_probe_folder(tmp_path):
    """A probe's folder is named after it: 'npz_float_labels' holds 'labels'."""
    folder = tmp_path / "npz_float_labels"
    probe = cases.probe("npz_float_labels", "train", expect="labels")
    output = f"error: {folder}/job.toml: [training] dataset_path does not exist\n"
    assert runner.judge(probe, 2, output, False, folder)[0] == "FAIL"
    output = f"error: {folder}/data.npz: 'labels' has dtype float64\n"
    assert runner.judge(probe, 2, output, False, folder)[0] == "PASS"
    probe = cases.probe("npz_float_labels", "train", expect="{dir}/data.npz: 'labels'")
    assert runner.judge(probe, 2, output, False, folder)[0] == "PASS"


@pytest.mark.parametrize("body,verdict,reason", [
    ("import sys\nprint('error: bad value', file=sys.stderr)\nsys.exit(2)\n", "PASS", "one-line error"),
    ("raise ValueError('bad value')\n", "FAIL", "traceback: ValueError: bad value"),
    ("print('error: bad value')\n", "FAIL", "exit 0"),
    ("import time\ntime.sleep(60)\n", "FAIL", "hang"),
])
@pytest.mark.parametrize("isolated", [False, True], ids=["forked", "isolated"])
def test_runner_reports_what_the_entry_point_did(tmp_path, body, verdict, reason, isolated):
    script = tmp_path / "entry.py"
    script.write_text(body)
    probe = cases.probe("tiny", f"script:{script}", toml=None, expect="bad value")
    outcome = runner.run_probe(probe, tmp_path / "probes", timeout=3, isolated=isolated)
    assert (outcome.verdict, outcome.reason[: len(reason)]) == (verdict, reason), outcome
