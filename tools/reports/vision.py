"""Reproduce docs/vision.md's numbers from scratch in one run (CPU, no downloads).

    python tools/reports/vision.py [--job.config_file CONFIG ...] [--out outputs/vision_report]
                                  [--sequential] [--quick] [--seed N] [--phases vit dit]

Each --job.config_file is a DiffusionBlocks config of a vision family (default:
train_configs/vit_digits.toml and dit_digits.toml); its end-to-end twin is the same
config with `--diffusion_blocks.no_enable`, at EQUAL OPTIMIZER UPDATES PER LAYER
PARAMETER: with B blocks and the random schedule a block is trained in ~1/B of the
steps, so the twin gets 1/B of the config's steps and warmup.
1. ViT (dblocks_vit): both test accuracies via tools/classify.py.
2. DiT (dblocks_dit): each checkpoint judged by tools/eval_dit.py (sample accuracy and
   Frechet distance of a CNN trained here; CFG scales 1 and 2) with a PNG grid.

Each pair trains concurrently (one thread each, 2 cores) unless --sequential. Writes
<out>/report.md, <out>/report.json, the grids and every run's log; prints the table.
--seed N: model-initialisation and block/sigma seeds of every run (default: the
configs', 0). --phases: run only the ViT or the DiT part. --quick: a few steps each,
to check the pipeline (numbers meaningless).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "plugins"))

from diffusion_blocks.config.bounds import number_arg, SEED  # noqa: E402
from diffusion_blocks.config.loader import parse_job_config  # noqa: E402
from common import run_all  # noqa: E402


DEFAULT_CONFIGS = ["train_configs/vit_digits.toml", "train_configs/dit_digits.toml"]
PHASE_OF_MODEL = {"dblocks_vit": "vit", "dblocks_dit": "dit"}
TWIN = ["--diffusion_blocks.no_enable"]


@dataclass
class Run:
    name: str
    config: str
    model_overrides: list[str]  # what makes this run's model (the twin switch): for evaluation too
    overrides: list[str]        # training only

    def folder(self, out: Path) -> Path:
        return out / self.name

    def config_args(self) -> list[str]:
        return ["--job.config_file", str(REPO / self.config), *self.model_overrides]


def train_command(run: Run, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "diffusion_blocks.train", *run.config_args(),
        "--job.dump_folder", str(run.folder(out)), *run.overrides,
    ]


def last_json_line(log: Path) -> dict:
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def equal_update_pair(config: str, quick: bool, seed: int | None) -> tuple[Run, Run, dict]:
    """The DiffusionBlocks run as configured; its twin with 1/B of the steps and warmup."""
    dblocks = parse_job_config(["--job.config_file", str(REPO / config)])
    num_blocks = dblocks.diffusion_blocks.num_blocks
    steps = 20 if quick else dblocks.training.steps // num_blocks
    warmup = 5 if quick else dblocks.lr_scheduler.warmup_steps // num_blocks
    common = ["--metrics.log_freq", "10" if quick else "500"]
    if seed is not None:
        common += ["--debug.seed", str(seed), "--diffusion_blocks.seed", str(seed)]
    if quick:
        common += ["--validation.freq", "1000000", "--checkpoint.interval", "1000000"]
    budget = {"e2e_steps": steps, "dblocks_steps": num_blocks * steps, "num_blocks": num_blocks,
              "config": config}
    stem = Path(config).stem
    return (
        Run(stem, config, [], [
            "--training.steps", str(num_blocks * steps),
            "--lr_scheduler.warmup_steps", str(num_blocks * warmup), *common]),
        Run(f"{stem}_e2e", config, TWIN, [
            "--training.steps", str(steps), "--lr_scheduler.warmup_steps", str(warmup), *common]),
        budget,
    )


def vit_phase(config: str, out: Path, parallel: bool, quick: bool, seed: int | None) -> dict:
    dblocks, e2e, budget = equal_update_pair(config, quick, seed)
    runs = [dblocks, e2e]
    train_seconds = run_all([(train_command(r, out), r.folder(out) / "train.log") for r in runs], parallel)
    results = {"budget": budget}
    for key, run, seconds in zip(("dblocks", "e2e"), runs, train_seconds):
        log = run.folder(out) / "classify.log"
        run_all([([sys.executable, str(REPO / "tools/classify.py"), *run.config_args(),
                   "--checkpoint", str(run.folder(out) / "checkpoint"), "--json"], log)], parallel=False)
        results[key] = {**last_json_line(log), "train_seconds": seconds}
    return results


def dit_phase(config: str, out: Path, parallel: bool, quick: bool, seed: int | None) -> dict:
    dblocks, e2e, budget = equal_update_pair(config, quick, seed)
    runs = [dblocks, e2e]
    train_seconds = run_all([(train_command(r, out), r.folder(out) / "train.log") for r in runs], parallel)
    per_class = "5" if quick else "50"
    evals = [
        ([sys.executable, str(REPO / "tools/eval_dit.py"), *r.config_args(),
          "--checkpoint", str(r.folder(out) / "checkpoint"), "--samples-per-class", per_class,
          "--cfg-scale", "2.0", "1.0", "--grid", str(out / f"{r.name}_samples.png"), "--json"],
         r.folder(out) / "eval_dit.log")
        for r in runs
    ]
    eval_seconds = run_all(evals, parallel)
    results = {"budget": budget}
    for key, run, train_s, eval_s in zip(("dblocks", "e2e"), runs, train_seconds, eval_seconds):
        results[key] = {**last_json_line(run.folder(out) / "eval_dit.log"),
                        "train_seconds": train_s, "eval_seconds": eval_s}
    return results


def vit_markdown(vit: dict) -> list[str]:
    budget, dblocks, e2e = vit["budget"], vit["dblocks"], vit["e2e"]
    return [
        f"ViT, `{budget['config']}` (test split, {dblocks['num_examples']} images), equal optimizer "
        f"updates per layer parameter: DiffusionBlocks B = {budget['num_blocks']} trained "
        f"{budget['dblocks_steps']} steps, end-to-end {budget['e2e_steps']} steps.",
        "",
        "| model | test accuracy | train wall time |",
        "|---|---|---|",
        f"| ViT, DiffusionBlocks (B = {budget['num_blocks']}) | {100 * dblocks['accuracy']:.2f} % | "
        f"{dblocks['train_seconds']:.0f} s |",
        f"| ViT, end-to-end | {100 * e2e['accuracy']:.2f} % | {e2e['train_seconds']:.0f} s |",
        "",
        f"Gap: {100 * (e2e['accuracy'] - dblocks['accuracy']):+.2f} points "
        "(end-to-end minus DiffusionBlocks).",
        "",
    ]


def dit_markdown(dit: dict) -> list[str]:
    budget, dblocks, e2e = dit["budget"], dit["dblocks"], dit["e2e"]
    lines = [
        f"DiT, `{budget['config']}`, DiffusionBlocks B = {budget['num_blocks']} trained "
        f"{budget['dblocks_steps']} steps, end-to-end {budget['e2e_steps']} steps; "
        f"{dblocks['num_samples']} class-conditional samples each, {dblocks['sampling_steps']} "
        f"Euler steps. Judge: a CNN trained here on the training split (test accuracy "
        f"{100 * dblocks['judge_test_accuracy']:.2f} %). Frechet distance of "
        f"{dblocks['num_samples']} real training images to the test images: "
        f"{dblocks['real_train_frechet_distance']:.2f} (what a perfect generator would get).",
        "",
        "| model | CFG scale | sample accuracy | Frechet distance | train wall time |",
        "|---|---|---|---|---|",
    ]
    for label, result in ((f"DiT, DiffusionBlocks (B = {budget['num_blocks']})", dblocks), ("DiT, end-to-end", e2e)):
        for scale, q in result["by_cfg_scale"].items():
            lines.append(
                f"| {label} | {scale} | {100 * q['sample_accuracy']:.2f} % | "
                f"{q['frechet_distance']:.2f} | {result['train_seconds']:.0f} s |"
            )
    lines += ["", f"Sample grids (one row per class, CFG {next(iter(dblocks['by_cfg_scale']))}): "
              f"`{Path(dblocks['grid']).name}`, `{Path(e2e['grid']).name}`.", ""]
    return lines


def markdown(report: dict, command: str) -> str:
    lines = [f"Command: `{command}` ({report['total_minutes']:.1f} min wall on this machine).", ""]
    for phase, results in report["phases"]:
        lines += vit_markdown(results) if phase == "vit" else dit_markdown(results)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job.config_file", dest="configs", action="append", default=None,
                        help="a DiffusionBlocks dblocks_vit / dblocks_dit config (repeatable; "
                             f"default: {' '.join(DEFAULT_CONFIGS)})")
    parser.add_argument("--out", default=str(REPO / "outputs" / "vision_report"))
    parser.add_argument("--sequential", action="store_true", help="one training at a time")
    parser.add_argument("--quick", action="store_true", help="a few steps each: pipeline check only")
    parser.add_argument("--seed", type=number_arg(int, SEED), default=None,
                        help="--debug.seed and --diffusion_blocks.seed of every run (default: the configs')")
    parser.add_argument("--phases", nargs="+", choices=["vit", "dit"], default=["vit", "dit"])
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python tools/reports/vision.py", *sys.argv[1:]])
    started = time.perf_counter()
    report = {"phases": []}
    for config in args.configs or DEFAULT_CONFIGS:
        name = parse_job_config(["--job.config_file", str(REPO / config)]).model.name
        if name not in PHASE_OF_MODEL:
            parser.error(f"--job.config_file {config}: [model] name = {name!r}; this report "
                         f"trains {sorted(PHASE_OF_MODEL)} configs")
        phase = PHASE_OF_MODEL[name]
        if phase not in args.phases:
            continue
        run_phase = vit_phase if phase == "vit" else dit_phase
        report["phases"].append((phase, run_phase(config, out, not args.sequential, args.quick, args.seed)))
        print(f"{config} done after {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    report["total_minutes"] = (time.perf_counter() - started) / 60
    text = markdown(report, command)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(text)
    print(text)
    print(f"written: {out / 'report.md'}, {out / 'report.json'}")


if __name__ == "__main__":
    main()
