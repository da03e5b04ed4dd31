"""Run bad inputs against the entry points and print one verdict line per probe.

    python -m tests.probes [--json] [--only PATTERN ...] [--list] [--isolated]
                           [--timeout SECONDS] [--keep DIR]      (from the repository root)

Each probe is a user mistake (a config value, a tool flag, a data file) run against
one entry point (`python -m diffusion_blocks.train`, tools/generate.py, ...), from an
empty working directory, with its files written to a fresh folder. Verdict:

- PASS: the run exits non-zero with exactly one error line (`error: ...`, or argparse's
  `prog: error: ...`) that contains the probe's expected fragments, and no Python
  traceback anywhere in its output;
- FAIL: a traceback, exit 0, a hang (past --timeout), no error line or several, or an
  error line that misses the expected fragments (the run failed, but not for the
  reason the probe is about).

The exit status is 1 when any probe fails. By default the heavy imports (torch,
torchtitan, diffusion_blocks) are done once and every probe runs in a forked child of
that process, with its own working directory, argv and output files (seconds for the
whole list); `--isolated` starts a fresh interpreter per probe instead (what a user
does; minutes). The probes are in cases.py.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .cases import (
    BASE_CONFIGS, command_of, CONFIGS, entry_target, PLUGINS, Probe, probe_env, PROBES, TINY_CONFIG,
)


# ---------------------------------------------------------------------------
# Running one probe


@dataclass
class Outcome:
    name: str
    entry: str
    verdict: str        # PASS / FAIL
    reason: str         # why FAIL; for PASS, "one-line error"
    returncode: int | None
    seconds: float
    error_line: str
    command: list[str]


TRACEBACK = "Traceback (most recent call last)"
ERROR_LINE = re.compile(r"^(error: |\S+: error: )")


def judge(probe: Probe, returncode: int | None, output: str, timed_out: bool,
          folder: Path | None = None) -> tuple[str, str, str]:
    """(verdict, reason, error line) of one run's exit code and combined output."""
    lines = output.splitlines()
    errors = [line for line in lines if ERROR_LINE.match(line)]
    error_line = errors[0] if len(errors) == 1 else ""
    if timed_out:
        return "FAIL", "hang: killed after the timeout", error_line
    if TRACEBACK in output:
        # the exception: the first unindented line after the (last) traceback's frames
        after = output[output.rindex(TRACEBACK):].splitlines()[1:]
        exception = next((l for l in after if l.strip() and not l[0].isspace()), "")
        return "FAIL", f"traceback: {exception.strip()[:200]}", error_line
    if returncode == 0:
        return "FAIL", "exit 0", error_line
    if not errors:
        tail = next((l for l in reversed(lines) if l.strip()), "")
        return "FAIL", f"exit {returncode} without an error line (last line: {tail[:200]!r})", ""
    if len(errors) > 1:
        return "FAIL", f"{len(errors)} error lines", errors[0]
    # fragments are matched with the probe's folder written "{dir}", so a fragment
    # cannot match by accident inside that folder's name (it holds the probe's name)
    shown = error_line.replace(str(folder), "{dir}") if folder else error_line
    missing = [f for f in probe.expect if f not in shown]
    if missing:
        return "FAIL", f"error line lacks {missing}", error_line
    return "PASS", "one-line error", error_line


def fill(text: str, folder: Path) -> str:
    return text.replace("{dir}", str(folder))


def prepare(probe: Probe, folder: Path) -> list[str]:
    """Write the probe's config and files into `folder`; return its argv."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cwd").mkdir(exist_ok=True)
    for name, content in probe.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(fill(content, folder))
    args = [fill(a, folder) for a in probe.args]
    if probe.toml is None:
        return args
    base = probe.base or BASE_CONFIGS[probe.entry]
    (folder / "tiny.toml").write_text(
        f'extends = "{CONFIGS / base}"\n' + fill(TINY_CONFIG, folder)
    )
    toml = fill(probe.toml, folder)
    if not re.search(r"^\s*extends\s*=", toml, re.MULTILINE):
        toml = 'extends = "tiny.toml"\n' + toml
    (folder / "job.toml").write_text(toml)
    return ["--job.config_file", str(folder / "job.toml"), *args]


def run_isolated(entry: str, argv: list[str], cwd: Path, timeout: float):
    """(returncode, output, timed_out) of a fresh interpreter."""
    import subprocess

    try:
        proc = subprocess.run(command_of(entry, argv), cwd=cwd, env=probe_env(),
                              capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, False
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        return None, out.decode(errors="replace") if isinstance(out, bytes) else out, True


PRELOAD = ("torch", "numpy", "PIL.Image", "datasets", "torchtitan.train", "diffusion_blocks",
           "diffusion_blocks.config.loader", "diffusion_blocks.inference")


def preload() -> None:
    """The imports every entry point makes, done once before forking."""
    import importlib

    sys.path.insert(0, str(PLUGINS))
    os.environ.update(probe_env())
    for module in PRELOAD:
        importlib.import_module(module)


def _run_in_child(entry: str, argv: list[str]) -> int:
    """What the interpreter does for `python -m X` / `python file.py`: run it as
    __main__; an uncaught exception prints its traceback and exits 1."""
    import runpy
    import traceback

    kind, target = entry_target(entry)
    try:
        if kind == "module":
            sys.argv = [target, *argv]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target, *argv]
            sys.path.insert(0, str(Path(target).parent))
            runpy.run_path(target, run_name="__main__")
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - exactly what the interpreter reports
        traceback.print_exc()
        return 1


def run_forked(entry: str, argv: list[str], cwd: Path, timeout: float):
    """(returncode, output, timed_out) of a forked child of this (preloaded) process."""
    out_path = cwd.parent / "output.txt"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.setsid()
            os.chdir(cwd)
            fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            # fresh streams on the new fds (the parent's may be someone's capture objects)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            code = _run_in_child(entry, argv)
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code if isinstance(code, int) and 0 <= code < 256 else 1)
    deadline = time.monotonic() + timeout
    timed_out = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            timed_out = True
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = None
            break
        time.sleep(0.05)
    returncode = None if status is None else os.waitstatus_to_exitcode(status)
    return returncode, out_path.read_text(errors="replace"), timed_out


def run_probe(probe: Probe, root: Path, timeout: float, isolated: bool) -> Outcome:
    folder = root / probe.name
    argv = prepare(probe, folder)
    started = time.monotonic()
    runner = run_isolated if isolated else run_forked
    returncode, output, timed_out = runner(probe.entry, argv, folder / "cwd", timeout)
    (folder / "output.txt").write_text(output)
    verdict, reason, error_line = judge(probe, returncode, output, timed_out, folder)
    return Outcome(probe.name, probe.entry, verdict, reason, returncode,
                   round(time.monotonic() - started, 2), error_line,
                   command_of(probe.entry, argv))


# ---------------------------------------------------------------------------


def selected(patterns: list[str] | None) -> list[Probe]:
    if not patterns:
        return list(PROBES)
    chosen = [p for p in PROBES if any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns)]
    if not chosen:
        raise SystemExit(f"error: --only {patterns} matches no probe (--list shows them)")
    return chosen


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="one JSON list of outcomes")
    parser.add_argument("--only", nargs="+", metavar="PATTERN",
                        help="probes whose name matches (shell patterns)")
    parser.add_argument("--list", action="store_true", help="list the probes and exit")
    parser.add_argument("--isolated", action="store_true",
                        help="a fresh interpreter per probe instead of forked children")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per probe")
    parser.add_argument("--keep", default=None,
                        help="write the probes' folders (configs, files, output.txt) here")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    probes = selected(args.only)
    if args.list:
        for p in probes:
            print(f"{p.name:40s} {p.entry}")
        return 0
    if not args.isolated:
        preload()
    with tempfile.TemporaryDirectory(prefix="probe_inputs_") as scratch:
        root = Path(args.keep if args.keep else scratch).resolve()
        outcomes = []
        for p in probes:
            outcome = run_probe(p, root, args.timeout, args.isolated)
            outcomes.append(outcome)
            if not args.json:
                detail = outcome.error_line if outcome.verdict == "PASS" else outcome.reason
                print(f"{outcome.verdict}  {outcome.name:40s} {outcome.entry:16s} {detail[:220]}",
                      flush=True)
    failed = [o for o in outcomes if o.verdict != "PASS"]
    if args.json:
        print(json.dumps([asdict(o) for o in outcomes], indent=1))
    else:
        print(f"{len(outcomes) - len(failed)} of {len(outcomes)} probes PASS")
    return 1 if failed else 0
