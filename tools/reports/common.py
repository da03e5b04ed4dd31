"""What the report tools share: splitting a corpus into training and held-out text,
the overrides every training run of a report takes, launching a training run (under
torchrun, with a progress bar) and running several commands at once."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[2]
STEP_LINE = re.compile(r"step:\s*(?:\x1b\[[0-9;]*m)?\s*(\d+)")


def split_corpus(source: Path, out: Path, val_fraction: float = 0.1) -> tuple[Path, str]:
    text = source.read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction))) + 1
    out.mkdir(parents=True, exist_ok=True)
    train_path = out / "train.txt"
    train_path.write_text(text[:cut], encoding="utf-8")
    return train_path, text[cut:]


def split_text(source: Path, out: Path, heldout_fraction: float = 0.1) -> tuple[Path, Path]:
    """train.txt and heldout.txt in `out`: the file cut at the line break before its
    last `heldout_fraction`."""
    text = source.read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * (1 - heldout_fraction))) + 1
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.txt", out / "heldout.txt"
    paths[0].write_text(text[:cut], encoding="utf-8")
    paths[1].write_text(text[cut:], encoding="utf-8")
    return paths


def common_overrides(
    config: Path, train_path: Path, dump: Path, steps: int, warmup: int
) -> list[str]:
    return [
        "--job.config_file", str(config),
        "--training.dataset_path", str(train_path),
        "--job.dump_folder", str(dump),
        "--training.steps", str(steps),
        "--lr_scheduler.warmup_steps", str(warmup),
        "--checkpoint.interval", str(steps),
        "--metrics.log_freq", str(min(50, steps)),
    ]


def train(name: str, overrides: list[str], steps: int, log: Path, position: int = 0) -> float:
    """One training run under torchrun, its output appended to `log` (a resumed run
    keeps the first part's), a progress bar on its steps; returns the seconds it took."""
    start = time.monotonic()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
           "-m", "diffusion_blocks.train", *overrides]
    print(f"$ {' '.join(cmd)}\n  (output: {log})", flush=True)
    with open(log, "a") as log_file, tqdm(total=steps, desc=f"train {name}", unit="step",
                                         position=position) as bar:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log_file.write(line)
            log_file.flush()  # a killed report leaves the whole log
            if match := STEP_LINE.search(line):
                bar.update(int(match.group(1)) - bar.n)
        if process.wait() != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
            raise SystemExit(f"training {name} failed (exit {process.returncode}); "
                             f"the end of {log}:\n{tail}")
    return time.monotonic() - start


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "plugins"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # tiny models: one thread per process beats two threads fighting over two cores
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_all(commands: list[tuple[list[str], Path]], parallel: bool) -> list[float]:
    """Run commands (stdout+stderr to their log files), all at once or one by one;
    returns the wall seconds of each."""
    seconds: list[float] = [0.0] * len(commands)
    running: dict[int, tuple[subprocess.Popen, float, Path]] = {}

    def finish(i: int) -> None:
        proc, start, log = running.pop(i)
        proc.wait()
        seconds[i] = time.perf_counter() - start
        if proc.returncode:
            tail = "".join(open(log).readlines()[-30:])
            raise SystemExit(f"command failed ({proc.returncode}), see {log}:\n{tail}")

    for i, (command, log) in enumerate(commands):
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)
        running[i] = (proc, time.perf_counter(), log)
        if not parallel:
            finish(i)
    while running:
        done = [i for i, (proc, _, _) in running.items() if proc.poll() is not None]
        for i in done:
            finish(i)
        time.sleep(0.5)
    return seconds
