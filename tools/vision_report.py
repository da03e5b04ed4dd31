"""Reproduce docs/vision.md's numbers from scratch in one run (CPU, no downloads).

    python tools/vision_report.py [--out outputs/vision_report] [--sequential] [--quick]

1. ViT on digits: DiffusionBlocks (train_configs/vit_digits.toml) and the plain ViT
   (vit_digits_e2e.toml) at EQUAL OPTIMIZER UPDATES PER LAYER PARAMETER: with B blocks
   and the random schedule a block is trained in ~1/B of the steps, so the
   DiffusionBlocks run gets B x the end-to-end run's steps and warmup (set here from
   the e2e config, whatever the dblocks config says). Both test accuracies via
   tools/classify.py.
2. DiT on digits: the same for dit_digits.toml / dit_digits_e2e.toml; each checkpoint
   judged by tools/eval_dit.py (sample accuracy and Frechet distance of a CNN trained
   here; CFG scales 1 and 2) with a PNG grid of samples.

Each pair trains concurrently (one thread each, 2 cores) unless --sequential. Writes
<out>/report.md, <out>/report.json, the grids and every run's log; prints the table.
--quick: a few steps each, to check the pipeline (numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

from diffusion_blocks.config_loader import parse_job_config  # noqa: E402


@dataclass
class Run:
    name: str
    config: str
    overrides: list[str]

    def folder(self, out: Path) -> Path:
        return out / self.name


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "plugins"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # tiny models: one thread per process beats two threads fighting over two cores
    env["OMP_NUM_THREADS"] = "1"
    return env


def train_command(run: Run, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "diffusion_blocks.train", "--job.config_file", str(REPO / run.config),
        "--job.dump_folder", str(run.folder(out)), *run.overrides,
    ]


def run_all(commands: list[tuple[list[str], Path]], parallel: bool) -> list[float]:
    """Run commands (stdout+stderr to their log files); returns wall seconds of each."""
    started, seconds, procs = [], [], []
    for command, log in commands:
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = open(log, "w")
        started.append(time.perf_counter())
        procs.append((subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO), handle, log))
        if not parallel:
            procs[-1][0].wait()
    for (proc, handle, log), start in zip(procs, started):
        proc.wait()
        handle.close()
        seconds.append(time.perf_counter() - start)
        if proc.returncode:
            tail = "".join(open(log).readlines()[-30:])
            raise SystemExit(f"command failed ({proc.returncode}), see {log}:\n{tail}")
    return seconds


def last_json_line(log: Path) -> dict:
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def equal_update_pair(dblocks_config: str, e2e_config: str, quick: bool) -> tuple[Run, Run, dict]:
    """The e2e run as configured; the dblocks run with B x its steps and warmup."""
    e2e = parse_job_config(["--job.config_file", str(REPO / e2e_config)])
    dblocks = parse_job_config(["--job.config_file", str(REPO / dblocks_config)])
    num_blocks = dblocks.diffusion_blocks.num_blocks
    steps = 20 if quick else e2e.training.steps
    warmup = 5 if quick else e2e.lr_scheduler.warmup_steps
    common = ["--metrics.log_freq", "10" if quick else "500"]
    if quick:
        common += ["--validation.freq", "1000000", "--checkpoint.interval", "1000000"]
    budget = {"e2e_steps": steps, "dblocks_steps": num_blocks * steps, "num_blocks": num_blocks}
    return (
        Run(Path(dblocks_config).stem, dblocks_config, [
            "--training.steps", str(num_blocks * steps),
            "--lr_scheduler.warmup_steps", str(num_blocks * warmup), *common]),
        Run(Path(e2e_config).stem, e2e_config, [
            "--training.steps", str(steps), "--lr_scheduler.warmup_steps", str(warmup), *common]),
        budget,
    )


def vit_phase(out: Path, parallel: bool, quick: bool) -> dict:
    dblocks, e2e, budget = equal_update_pair("train_configs/vit_digits.toml", "train_configs/vit_digits_e2e.toml", quick)
    runs = [dblocks, e2e]
    train_seconds = run_all([(train_command(r, out), r.folder(out) / "train.log") for r in runs], parallel)
    results = {"budget": budget}
    for run, seconds in zip(runs, train_seconds):
        log = run.folder(out) / "classify.log"
        run_all([([sys.executable, str(REPO / "tools/classify.py"), "--job.config_file", str(REPO / run.config),
                   "--checkpoint", str(run.folder(out) / "checkpoint"), "--json"], log)], parallel=False)
        results[run.name] = {**last_json_line(log), "train_seconds": seconds}
    return results


def dit_phase(out: Path, parallel: bool, quick: bool) -> dict:
    dblocks, e2e, budget = equal_update_pair("train_configs/dit_digits.toml", "train_configs/dit_digits_e2e.toml", quick)
    runs = [dblocks, e2e]
    train_seconds = run_all([(train_command(r, out), r.folder(out) / "train.log") for r in runs], parallel)
    per_class = "5" if quick else "50"
    evals = [
        ([sys.executable, str(REPO / "tools/eval_dit.py"), "--job.config_file", str(REPO / r.config),
          "--checkpoint", str(r.folder(out) / "checkpoint"), "--samples-per-class", per_class,
          "--cfg-scale", "2.0", "1.0", "--grid", str(out / f"{r.name}_samples.png"), "--json"],
         r.folder(out) / "eval_dit.log")
        for r in runs
    ]
    eval_seconds = run_all(evals, parallel)
    results = {"budget": budget}
    for run, train_s, eval_s in zip(runs, train_seconds, eval_seconds):
        results[run.name] = {**last_json_line(run.folder(out) / "eval_dit.log"),
                             "train_seconds": train_s, "eval_seconds": eval_s}
    return results


def markdown(report: dict, command: str) -> str:
    vit, dit = report["vit"], report["dit"]
    vb, db = vit["budget"], dit["budget"]
    lines = [
        f"Command: `{command}` ({report['total_minutes']:.1f} min wall on this machine).",
        "",
        f"ViT on digits (test split, {vit['vit_digits']['num_examples']} images), equal optimizer "
        f"updates per layer parameter: DiffusionBlocks B = {vb['num_blocks']} trained "
        f"{vb['dblocks_steps']} steps, end-to-end {vb['e2e_steps']} steps.",
        "",
        "| model | test accuracy | train wall time |",
        "|---|---|---|",
        f"| ViT, DiffusionBlocks (B = {vb['num_blocks']}) | {100 * vit['vit_digits']['accuracy']:.2f} % | "
        f"{vit['vit_digits']['train_seconds']:.0f} s |",
        f"| ViT, end-to-end | {100 * vit['vit_digits_e2e']['accuracy']:.2f} % | "
        f"{vit['vit_digits_e2e']['train_seconds']:.0f} s |",
        "",
        f"Gap: {100 * (vit['vit_digits_e2e']['accuracy'] - vit['vit_digits']['accuracy']):+.2f} points "
        "(end-to-end minus DiffusionBlocks).",
        "",
    ]
    dd, de = dit["dit_digits"], dit["dit_digits_e2e"]
    lines += [
        f"DiT on digits, DiffusionBlocks B = {db['num_blocks']} trained {db['dblocks_steps']} steps, "
        f"end-to-end {db['e2e_steps']} steps; {dd['num_samples']} class-conditional samples each, "
        f"{dd['sampling_steps']} Euler steps. Judge: a CNN trained here on the training split "
        f"(test accuracy {100 * dd['judge_test_accuracy']:.2f} %). Frechet distance of "
        f"{dd['num_samples']} real training images to the test images: "
        f"{dd['real_train_frechet_distance']:.2f} (what a perfect generator would get).",
        "",
        "| model | CFG scale | sample accuracy | Frechet distance | train wall time |",
        "|---|---|---|---|---|",
    ]
    for label, result in ((f"DiT, DiffusionBlocks (B = {db['num_blocks']})", dd), ("DiT, end-to-end", de)):
        for scale, q in result["by_cfg_scale"].items():
            lines.append(
                f"| {label} | {scale} | {100 * q['sample_accuracy']:.2f} % | "
                f"{q['frechet_distance']:.2f} | {result['train_seconds']:.0f} s |"
            )
    lines += ["", f"Sample grids (one row per class, CFG 2.0): `{Path(dd['grid']).name}`, `{Path(de['grid']).name}`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "outputs" / "vision_report"))
    parser.add_argument("--sequential", action="store_true", help="one training at a time")
    parser.add_argument("--quick", action="store_true", help="a few steps each: pipeline check only")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = "python tools/vision_report.py" + (" --sequential" if args.sequential else "") + (" --quick" if args.quick else "")
    started = time.perf_counter()
    report = {"vit": vit_phase(out, not args.sequential, args.quick)}
    print(f"ViT phase done after {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    report["dit"] = dit_phase(out, not args.sequential, args.quick)
    report["total_minutes"] = (time.perf_counter() - started) / 60
    text = markdown(report, command)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(text)
    print(text)
    print(f"written: {out / 'report.md'}, {out / 'report.json'}")


if __name__ == "__main__":
    main()
