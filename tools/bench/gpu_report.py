"""One-command GPU report: environment, correctness, memory, throughput, decoding and
the memory wall, on one CUDA GPU in under 8 minutes (docs/gpu.md).

    python tools/bench/gpu_report.py --out gpu_report.json [--dry-run] [--phases a,b]

Every phase is independent: a phase that raises is recorded as failed with its error
and the others still run; each has a time budget (the sum stays under 8 minutes) and
records its wall time; the JSON is rewritten after every phase, so a crash loses only
the phase it was in. `--dry-run` runs the same phases on the CPU at toy sizes (rows
that need CUDA say "skipped: needs CUDA"). Prints a markdown table at the end.
"""

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEBUG_TOML = REPO / "train_configs" / "llama3_debug.toml"
NEEDS_CUDA = "skipped: needs CUDA"
MiB = 2**20
LOSS_KEY = "loss_metrics/global_avg_loss"


# ---------------------------------------------------------------------------
# Results


@dataclass
class PhaseResult:
    name: str
    status: str = "ok"            # ok | failed
    wall_s: float = 0.0
    budget_s: float = 0.0
    rows: list[dict] = field(default_factory=list)
    error: str | None = None


@dataclass
class Sizes:
    """What each phase runs: the GPU report's shapes, or the dry run's toy ones."""

    device: str
    trainer_steps: int
    trainer_blocks: int
    trainer_compare_compiled: bool
    tiny_args: list[str]
    memory_shapes: dict[str, list[str]]
    memory_blocks: list[int]
    memory_ac: list[str]
    memory_offload: list[bool]
    throughput_shapes: dict[str, list[str]]
    throughput_steps: int
    throughput_compile: bool
    decode_flavor_args: list[str]
    decode_contexts: list[int]
    decode_new_tokens: int
    wall_args: list[str]
    wall_depths: list[int]      # the search's first probes (doubling after them on CUDA)
    wall_max_depth: int
    budgets: dict[str, float]


def gpu_sizes() -> Sizes:
    bf16 = ["--training.mixed_precision_param", "bfloat16"]
    return Sizes(
        device="cuda", trainer_steps=32, trainer_blocks=4, trainer_compare_compiled=True,
        tiny_args=["--training.seq_len", "128", "--training.local_batch_size", "8"],
        memory_shapes={
            "250M": ["--model.flavor", "250M", "--training.seq_len", "512",
                     "--training.local_batch_size", "2", *bf16],
            "1B": ["--model.flavor", "1B", "--training.seq_len", "2048",
                   "--training.local_batch_size", "1", *bf16],
        },
        memory_blocks=[2, 4, 8], memory_ac=["none", "full"], memory_offload=[False, True],
        throughput_shapes={
            "250M": ["--model.flavor", "250M", "--training.seq_len", "512",
                     "--training.local_batch_size", "8", *bf16],
            "1B": ["--model.flavor", "1B", "--training.seq_len", "2048",
                   "--training.local_batch_size", "1", *bf16],
        },
        throughput_steps=8, throughput_compile=True,
        decode_flavor_args=["--model.flavor", "250M"],
        decode_contexts=[256, 1024, 4096], decode_new_tokens=16,
        wall_args=["--training.seq_len", "2048", "--training.local_batch_size", "1", *bf16],
        wall_depths=[16, 32], wall_max_depth=128,  # 128 x 0.7 GB of host AdamW state
        budgets={"environment": 10, "correctness": 130, "memory": 130, "throughput": 80,
                 "decoding": 40, "memory_wall": 80},
    )


def dry_sizes() -> Sizes:
    tiny = ["--training.seq_len", "32", "--training.local_batch_size", "2"]
    return Sizes(
        device="cpu", trainer_steps=6, trainer_blocks=2, trainer_compare_compiled=False,
        tiny_args=tiny,
        memory_shapes={"debugmodel_8l": tiny}, memory_blocks=[2], memory_ac=["none"],
        memory_offload=[False, True],
        throughput_shapes={"debugmodel_8l": tiny}, throughput_steps=2, throughput_compile=False,
        decode_flavor_args=[], decode_contexts=[16, 32], decode_new_tokens=3,
        wall_args=tiny, wall_depths=[8], wall_max_depth=8,
        # generous: the dry run's cores are shared; these only stop a runaway phase
        budgets={"environment": 10, "correctness": 150, "memory": 60, "throughput": 60,
                 "decoding": 60, "memory_wall": 60},
    )


PHASES = ("environment", "correctness", "memory", "throughput", "decoding", "memory_wall")


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def spent(self) -> bool:
        return self.left() <= 0


def progress(message: str) -> None:
    print(f"[gpu_report {time.strftime('%H:%M:%S')}] {message}", flush=True)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:2000]


def budget_row(name: str) -> dict:
    return {"check": name, "status": "skipped: time budget"}


# ---------------------------------------------------------------------------
# Shared pieces: configs, trainers


def config_args(sizes: Sizes, *extra: str) -> list[str]:
    return ["--job.config_file", str(DEBUG_TOML), "--training.device", sizes.device,
            *sizes.tiny_args, *extra]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class StepFigures:
    steps: int
    seconds: float
    items: int
    peak_bytes: int | None
    activation_bytes: int
    resident_bytes: int
    flops_per_step: float | None


def run_trainer_steps(args: list[str], steps: int, warmup: int = 0,
                      count_flops: bool = False, count_activations: bool = True) -> StepFigures:
    """`steps` (after `warmup`) real BlockwiseTrainer.train_step calls, in this process.
    count_activations: saved-tensor hooks (they break fullgraph compiled layers)."""
    from diffusion_blocks.config.loader import parse_job_config
    from diffusion_blocks.eval.memory import (
        count_saved_activations, peak_device_bytes, resident_bytes,
    )
    from diffusion_blocks.train import BlockwiseTrainer
    from torch.utils.flop_counter import FlopCounterMode

    job_config = parse_job_config(args, reads_data=True)
    job_config.checkpoint.enable = False
    job_config.metrics.enable_tensorboard = False
    job_config.training.global_batch_size = -1
    job_config.job.dump_folder = tempfile.mkdtemp(prefix="gpu_report_")
    trainer = BlockwiseTrainer(job_config)
    cuda = trainer.device.type == "cuda"
    data = trainer.batch_generator(trainer.dataloader)
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(trainer.device)
        for _ in range(warmup):
            trainer.step += 1
            trainer.train_step(data)
        flops = None
        if count_flops:
            trainer.step += 1
            # compiled kernels bypass the dispatcher the counter listens to: count eagerly
            with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
                trainer.train_step(data)
            flops = float(counter.get_total_flops()) or None
        activation, resident = 0, 0
        items_before = trainer.ntokens_seen
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step += 1
            if count_activations:
                with count_saved_activations(trainer.model) as saved:
                    trainer.train_step(data)
                activation = max(activation, saved.bytes)
            else:
                trainer.train_step(data)
            resident = max(resident, resident_bytes(
                trainer.model, trainer.optimizers, trainer.device).total)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return StepFigures(steps, seconds, trainer.ntokens_seen - items_before,
                           peak_device_bytes(trainer.device), activation, resident, flops)
    finally:
        trainer.close()
        del trainer, data
        free_memory()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ---------------------------------------------------------------------------
# Phase: environment


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def phase_environment(sizes: Sizes, budget: Budget) -> list[dict]:
    cuda = torch.cuda.is_available()
    return [{
        "check": "environment", "status": "pass",
        "gpu": torch.cuda.get_device_name(0) if cuda else "none (CPU)",
        "cuda": torch.version.cuda, "torch": torch.__version__,
        "torchtitan": package_version("torchtitan"),
        "cut_cross_entropy": package_version("cut-cross-entropy"),
        "python": platform.python_version(), "git_commit": git_commit(),
        "device": sizes.device,
    }]


# ---------------------------------------------------------------------------
# Phase: correctness


def trainer_losses(sizes: Sizes, compiled: bool, timeout: float) -> list[float]:
    """The logged losses of a real `torchrun -m diffusion_blocks.train` run (FSDP2, one
    rank; NCCL on CUDA, gloo on the CPU), read from its metrics.jsonl."""
    dump = Path(tempfile.mkdtemp(prefix="gpu_report_train_"))
    # one CPU process needs no torchrun agent (the trainer sets up its own rendezvous)
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    cmd = [sys.executable, *(launcher if sizes.device == "cuda" else []),
           "-m", "diffusion_blocks.train", *config_args(sizes),
           "--diffusion_blocks.num_blocks", str(sizes.trainer_blocks),
           "--training.steps", str(sizes.trainer_steps), "--metrics.log_freq", "1",
           "--metrics.no_enable_tensorboard", "--checkpoint.no_enable",
           "--diffusion_blocks.block_schedule", "round_robin", "--lr_scheduler.warmup_steps", "1",
           "--job.dump_folder", str(dump),
           "--compile.enable" if compiled else "--compile.no_enable"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "plugins"), env.get("PYTHONPATH")) if p)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_USE_AGENT_STORE"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=max(timeout, 1))
    if proc.returncode != 0:
        raise RuntimeError(f"trainer exit {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return [float(r[LOSS_KEY]) for r in rows if LOSS_KEY in r]


def loss_checks(losses: list[float], label: str, cycle: int) -> dict:
    """Finite, and (per round-robin cycle of the B blocks) the last cycle's mean below
    the first's: each block's loss lives on its own sigma scale."""
    finite = all(math.isfinite(x) for x in losses)
    first, last = losses[:cycle], losses[-cycle:]
    decreasing = len(losses) >= 2 * cycle and sum(last) < sum(first)
    return {"check": f"trainer {label}: finite, decreasing loss",
            "status": "pass" if finite and decreasing else "fail",
            "steps": len(losses), "first_cycle_mean": sum(first) / max(len(first), 1),
            "last_cycle_mean": sum(last) / max(len(last), 1), "finite": finite,
            "decreasing": decreasing}


def check_trainer(sizes: Sizes, budget: Budget) -> list[dict]:
    eager = trainer_losses(sizes, compiled=False, timeout=budget.left())
    rows = [loss_checks(eager, "eager", sizes.trainer_blocks)]
    if not sizes.trainer_compare_compiled:
        rows.append({"check": "trainer compiled vs eager losses", "status": NEEDS_CUDA})
        return rows
    if budget.spent():
        return rows + [budget_row("trainer compiled vs eager losses")]
    compiled = trainer_losses(sizes, compiled=True, timeout=budget.left())
    rows.append(loss_checks(compiled, "compiled", sizes.trainer_blocks))
    diffs = [abs(a - b) / max(abs(b), 1e-6) for a, b in zip(compiled, eager)]
    worst = max(diffs[:10], default=float("nan"))  # bf16/compile drift grows with steps
    rows.append({"check": "trainer compiled vs eager losses (first 10 steps, rel)",
                 "status": "pass" if worst < 0.05 else "fail", "max_rel_diff": worst,
                 "max_rel_diff_all_steps": max(diffs, default=float("nan"))})
    return rows


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


def denoiser_pair(sizes: Sizes):
    """(SDPA model, flex model with the same weights) of the 8-layer debug flavor."""
    from diffusion_blocks.config.loader import parse_job_config
    from diffusion_blocks.inference import build_for_inference

    device = torch.device(sizes.device)
    torch.manual_seed(0)
    sdpa, _, _ = build_for_inference(parse_job_config(config_args(sizes)), device)
    flex, _, _ = build_for_inference(parse_job_config(
        config_args(sizes, "--model.flavor", "debugmodel_8l_flex_attn")), device)
    flex.load_state_dict(sdpa.state_dict())
    return sdpa, flex


def check_flex_vs_sdpa(sizes: Sizes, budget: Budget) -> list[dict]:
    """The flex flavor's logits (and, on CUDA, gradients) vs the SDPA flavor's on one batch."""
    from diffusion_blocks.models.llama3 import model as llama_model
    from torch.nn.attention.flex_attention import flex_attention

    sdpa, flex = denoiser_pair(sizes)
    cuda = sizes.device == "cuda"
    saved_types, saved_wrapper = flex.FLEX_DEVICE_TYPES, llama_model.FlexAttentionWrapper
    if not cuda:  # eager flex_attention, forward only, as tests/test_llama_model.py does
        type(flex).FLEX_DEVICE_TYPES = ("cuda", "cpu")
        llama_model.FlexAttentionWrapper = lambda: flex_attention
    try:
        return flex_rows(sdpa, flex, cuda)
    finally:
        type(flex).FLEX_DEVICE_TYPES, llama_model.FlexAttentionWrapper = saved_types, saved_wrapper


def flex_rows(sdpa, flex, cuda: bool) -> list[dict]:
    device = next(sdpa.parameters()).device
    seq = min(64, sdpa.model_args.max_seq_len // 2)
    vocab, dim = sdpa.tok_embeddings.weight.shape[0], sdpa.model_args.dim
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, seq), generator=gen).to(device)
    z = torch.randn(2, seq, dim, generator=gen).to(device)
    sigma = torch.full((2,), 1.0, device=device)
    dtype = torch.bfloat16 if cuda else torch.float32
    results = {}
    for name, model in (("sdpa", sdpa), ("flex", flex)):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=cuda), torch.set_grad_enabled(cuda):
            logits = model.denoise(tokens, z, sigma, 0).logits_BTV
        if cuda:
            logits.float().square().mean().backward()
        results[name] = (logits.detach(), model.layers["0"].attention.wq.weight.grad)
    tol = 2e-2 if cuda else 1e-4
    logit_err = max_rel_err(results["flex"][0], results["sdpa"][0])
    # a flex model that fell back to the dense mask would compare SDPA with itself
    mask = type(flex.attention_mask(seq, device)).__name__
    ok = logit_err < tol and mask == "BlockMask"
    rows = [{"check": "flex vs SDPA logits", "status": "pass" if ok else "fail",
             "max_rel_err": logit_err, "tolerance": tol, "flex_mask": mask}]
    if not cuda:
        rows.append({"check": "flex vs SDPA gradients", "status": NEEDS_CUDA})
        return rows
    grad_err = max_rel_err(results["flex"][1], results["sdpa"][1])
    rows.append({"check": "flex vs SDPA gradients (layer 0 wq)",
                 "status": "pass" if grad_err < 5e-2 else "fail", "max_rel_err": grad_err,
                 "tolerance": 5e-2})
    return rows


def check_fused_ce(sizes: Sizes, budget: Budget) -> list[dict]:
    """cut-cross-entropy's kernel vs our chunked head: per-row CE and both gradients."""
    from diffusion_blocks.components.linear_ce import (
        chunked_linear_cross_entropy, cut_cross_entropy_kernel, fused_linear_cross_entropy,
    )

    name = "fused CE kernel vs chunked head"
    if sizes.device != "cuda":
        return [{"check": name, "status": NEEDS_CUDA}]
    if cut_cross_entropy_kernel() is None:
        return [{"check": name, "status": "skipped: cut-cross-entropy not importable"}]
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1024, 512, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(32000, 512, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.05
    labels = torch.randint(0, 32000, (1024,), device="cuda", generator=gen)
    figures = {}
    for label, fn in (("fused", lambda a, b: fused_linear_cross_entropy(a, b, labels)),
                      ("chunked", lambda a, b: chunked_linear_cross_entropy(a, b, labels))):
        a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
        ce = fn(a, b)
        ce.sum().backward()
        figures[label] = (ce.detach(), a.grad, b.grad)
    errs = [max_rel_err(figures["fused"][i], figures["chunked"][i]) for i in range(3)]
    return [{"check": name, "status": "pass" if max(errs) < 2e-2 else "fail",
             "loss_rel_err": errs[0], "grad_h_rel_err": errs[1], "grad_w_rel_err": errs[2],
             "tolerance": 2e-2}]


def check_kv_cache(sizes: Sizes, budget: Budget) -> list[dict]:
    """Greedy decoding with and without the KV cache: the same tokens, both recipes."""
    from diffusion_blocks.config.loader import parse_job_config
    from diffusion_blocks.inference import build_for_inference
    from diffusion_blocks.models.llama3.sampler import DecodingConfig, generate

    device = torch.device(sizes.device)
    rows = []
    for recipe, flag in (("dblocks", "--diffusion_blocks.enable"),
                         ("e2e", "--diffusion_blocks.no_enable")):
        torch.manual_seed(0)
        model, _, _ = build_for_inference(parse_job_config(config_args(sizes, flag)), device)
        prompt = torch.randint(0, model.tok_embeddings.weight.shape[0], (1, 8),
                               generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            out = {kv: generate(model, prompt, DecodingConfig(max_new_tokens=8, kv_cache=kv),
                                model.model_args.max_seq_len) for kv in (True, False)}
        same = torch.equal(out[True], out[False])
        rows.append({"check": f"KV-cached vs uncached decoding ({recipe})",
                     "status": "pass" if same else "fail",
                     "tokens_cached": out[True][0, 8:].tolist(),
                     "tokens_uncached": out[False][0, 8:].tolist()})
        del model
        free_memory()
    return rows


CORRECTNESS_CHECKS = (check_trainer, check_flex_vs_sdpa, check_fused_ce, check_kv_cache)


def phase_correctness(sizes: Sizes, budget: Budget) -> list[dict]:
    """Each check independent: one that raises becomes a failed row."""
    rows = []
    for check in CORRECTNESS_CHECKS:
        if budget.spent():
            rows.append(budget_row(check.__name__))
            continue
        progress(f"  correctness: {check.__name__}")
        try:
            rows.extend(check(sizes, budget))
        except Exception as exc:  # noqa: BLE001 - recorded, the next check runs
            rows.append({"check": check.__name__, "status": "fail", "error": error_text(exc)})
    return rows


# ---------------------------------------------------------------------------
# Phase: memory


def estimated_peak(args: list[str]) -> int:
    from diffusion_blocks.config.loader import parse_job_config
    from diffusion_blocks.eval.memory import estimate_step

    return estimate_step(parse_job_config(args), 1).peak_bytes


def memory_settings(sizes: Sizes) -> list[tuple]:
    """(shape, ac, mode, B, offload) rows; end to end and B = 4 of every shape and AC
    first, so that a phase out of time has measured the headline comparison."""
    rows = []
    for shape, ac in ((s, a) for s in sizes.memory_shapes for a in sizes.memory_ac):
        rows.append((shape, ac, "e2e", 1, False))
        for num_blocks in sizes.memory_blocks:
            for offload in sizes.memory_offload:
                rows.append((shape, ac, "dblocks", num_blocks, offload))
    return sorted(rows, key=lambda r: r[2] == "dblocks" and r[3] != 4)  # stable


def memory_row(sizes: Sizes, shape, ac, mode, num_blocks, offload) -> dict:
    row = {"check": "memory", "shape": shape, "ac": ac, "mode": mode,
           "num_blocks": num_blocks, "offload": offload}
    if offload and sizes.device != "cuda":
        return {**row, "status": NEEDS_CUDA}
    args = config_args(sizes, *sizes.memory_shapes[shape], "--activation_checkpoint.mode", ac)
    if mode == "e2e":
        args += ["--diffusion_blocks.no_enable"]
    else:
        args += ["--diffusion_blocks.num_blocks", str(num_blocks),
                 "--diffusion_blocks.block_schedule", "round_robin",
                 "--diffusion_blocks.offload_inactive_blocks", "on" if offload else "off"]
    estimate = estimated_peak(args)
    figures = run_trainer_steps(args, steps=max(num_blocks, 2) if sizes.device == "cuda" else 1)
    # on the CPU there is no allocator peak: activations + resident state stand in
    measured = figures.peak_bytes or (figures.activation_bytes + figures.resident_bytes)
    return {**row, "status": "real", "measured_bytes": measured,
            "measured_kind": "max_memory_allocated" if figures.peak_bytes else "activations+resident",
            "estimated_bytes": estimate, "measured_over_estimated": measured / estimate}


def phase_memory(sizes: Sizes, budget: Budget) -> list[dict]:
    rows = []
    for setting in memory_settings(sizes):
        if budget.spent():
            rows.append({**budget_row("memory"), "setting": list(setting)})
            continue
        try:
            rows.append(memory_row(sizes, *setting))
        except Exception as exc:  # noqa: BLE001 - an OOM or failure is this row's result
            rows.append({"check": "memory", "setting": list(setting),
                         "status": "oom" if is_oom(exc) else "fail", "error": error_text(exc)})
            free_memory()
    return rows


# ---------------------------------------------------------------------------
# Phase: throughput


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    from torchtitan.tools.utils import get_peak_flops

    return get_peak_flops(torch.cuda.get_device_name(0))


def throughput_row(sizes: Sizes, shape: str, mode: str) -> dict:
    compile_flag = "--compile.enable" if sizes.throughput_compile else "--compile.no_enable"
    recipe = ["--diffusion_blocks.no_enable"] if mode == "e2e" else [
        "--diffusion_blocks.num_blocks", "4"]
    args = config_args(sizes, *sizes.throughput_shapes[shape], compile_flag, *recipe)
    figures = run_trainer_steps(args, sizes.throughput_steps, warmup=2,
                                count_flops=sizes.device == "cuda", count_activations=False)
    peak = peak_flops()
    mfu = None
    if peak and figures.flops_per_step:
        mfu = figures.flops_per_step * figures.steps / figures.seconds / peak
    return {"check": "throughput", "status": "real", "shape": shape, "mode": mode,
            "compiled": sizes.throughput_compile,
            "tokens_per_s": figures.items / figures.seconds,
            "seconds_per_step": figures.seconds / figures.steps, "mfu": mfu}


def phase_throughput(sizes: Sizes, budget: Budget) -> list[dict]:
    rows = []
    for shape in sizes.throughput_shapes:
        for mode in ("e2e", "dblocks"):
            if budget.spent():
                rows.append({**budget_row("throughput"), "shape": shape, "mode": mode})
                continue
            try:
                rows.append(throughput_row(sizes, shape, mode))
            except Exception as exc:  # noqa: BLE001
                rows.append({"check": "throughput", "shape": shape, "mode": mode,
                             "status": "oom" if is_oom(exc) else "fail", "error": error_text(exc)})
                free_memory()
    return rows


# ---------------------------------------------------------------------------
# Phase: decoding


def timed_tokens_per_s(model, prompt, new_tokens: int) -> float:
    from diffusion_blocks.models.llama3.sampler import DecodingConfig, generate

    stamps = []

    def on_token():
        if prompt.device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    generate(model, prompt, DecodingConfig(max_new_tokens=new_tokens), model.model_args.max_seq_len,
             on_token=on_token)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])  # the first token holds the prefill


def phase_decoding(sizes: Sizes, budget: Budget) -> list[dict]:
    from diffusion_blocks.config.loader import parse_job_config
    from diffusion_blocks.inference import build_for_inference

    device = torch.device(sizes.device)
    seq_len = max(sizes.decode_contexts) + sizes.decode_new_tokens + 1
    models = {}
    for recipe, flag in (("dblocks", "--diffusion_blocks.enable"),
                         ("e2e", "--diffusion_blocks.no_enable")):
        args = config_args(sizes, *sizes.decode_flavor_args, "--training.seq_len", str(seq_len), flag)
        models[recipe], _, _ = build_for_inference(parse_job_config(args), device)
        if device.type == "cuda":
            models[recipe].to(torch.bfloat16)
    rows = []
    vocab = models["e2e"].tok_embeddings.weight.shape[0]
    for context in sizes.decode_contexts:
        if budget.spent():
            rows.append({**budget_row("decoding"), "context": context})
            continue
        prompt = torch.randint(0, vocab, (1, context),
                               generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            speed = {r: timed_tokens_per_s(m, prompt, sizes.decode_new_tokens)
                     for r, m in models.items()}
        rows.append({"check": "decoding (KV cache)", "status": "real", "context": context,
                     "dblocks_tokens_per_s": speed["dblocks"], "e2e_tokens_per_s": speed["e2e"],
                     "ratio": speed["dblocks"] / speed["e2e"]})
    return rows


# ---------------------------------------------------------------------------
# Phase: the memory wall


def depth_flavor(sizes: Sizes, depth: int) -> str:
    """A flavor of `depth` layers at the wall's shape (1B's on CUDA, the debug model's
    in the dry run), registered in the train spec's flavor table."""
    from torchtitan.protocols.train_spec import get_train_spec

    flavors = get_train_spec("dblocks_llama3").model_args
    base = "1B" if sizes.device == "cuda" else "debugmodel_8l"
    name = f"wall_{base}_{depth}l"
    flavors.setdefault(name, dataclasses.replace(copy.deepcopy(flavors[base]), n_layers=depth))
    return name


def wall_try(sizes: Sizes, recipe: str, depth: int) -> dict:
    e2e = ["--diffusion_blocks.no_enable", "--diffusion_blocks.num_blocks", "1"]
    flag = e2e if recipe == "e2e" else [
        "--diffusion_blocks.num_blocks", recipe.split("=")[1],
        "--diffusion_blocks.block_schedule", "round_robin",
        "--diffusion_blocks.offload_inactive_blocks", "on" if sizes.device == "cuda" else "off"]
    args = config_args(sizes, *sizes.wall_args, "--model.flavor", depth_flavor(sizes, depth), *flag)
    try:
        figures = run_trainer_steps(args, steps=2, count_activations=False)
    except Exception as exc:  # noqa: BLE001
        free_memory()
        if is_oom(exc):
            return {"depth": depth, "status": "oom"}
        raise
    return {"depth": depth, "status": "real", "peak_bytes": figures.peak_bytes}


def deepest(sizes: Sizes, recipe: str, budget: Budget) -> dict:
    """Doubling from the first probes until OOM (or the cap), then bisecting between the
    last real depth and the first OOM; a multiple of B so the blocks split evenly."""
    step = 1 if recipe == "e2e" else int(recipe.split("=")[1])
    tries, best, worst = [], 0, None
    depth = sizes.wall_depths[0]
    while depth <= sizes.wall_max_depth and not budget.spent():
        outcome = wall_try(sizes, recipe, depth)
        tries.append(outcome)
        if outcome["status"] == "oom":
            worst = depth
            break
        best = depth
        depth *= 2
    while worst is not None and worst - best > step and not budget.spent():
        middle = (best + worst) // 2 // step * step
        if middle <= best:
            break
        outcome = wall_try(sizes, recipe, middle)
        tries.append(outcome)
        best, worst = (middle, worst) if outcome["status"] == "real" else (best, middle)
    stopped = "oom" if worst is not None else ("cap" if depth > sizes.wall_max_depth else "time budget")
    return {"check": "memory wall", "recipe": recipe, "status": "real" if best else "fail",
            "deepest_real": best, "first_oom": worst, "stopped_by": stopped, "tries": tries}


def phase_memory_wall(sizes: Sizes, budget: Budget) -> list[dict]:
    rows = []
    recipes = ["e2e", "dblocks B=4", "dblocks B=8"]
    for index, recipe in enumerate(recipes):
        # each recipe gets its share of what is left
        share = Budget(budget.left() / (len(recipes) - index))
        try:
            rows.append(deepest(sizes, recipe.replace("dblocks ", ""), share))
            rows[-1]["recipe"] = recipe
        except Exception as exc:  # noqa: BLE001
            rows.append({"check": "memory wall", "recipe": recipe, "status": "fail",
                         "error": error_text(exc)})
    return rows


# ---------------------------------------------------------------------------
# Running, writing, printing


PHASE_FUNCTIONS = {
    "environment": phase_environment, "correctness": phase_correctness,
    "memory": phase_memory, "throughput": phase_throughput, "decoding": phase_decoding,
    "memory_wall": phase_memory_wall,
}


def run_phase(name: str, sizes: Sizes, fail_phase: str | None) -> PhaseResult:
    result = PhaseResult(name, budget_s=sizes.budgets[name])
    start = time.monotonic()
    progress(f"phase {name} (budget {result.budget_s:.0f} s)")
    try:
        if name == fail_phase:
            raise RuntimeError(f"--fail-phase {name}: planted failure")
        result.rows = PHASE_FUNCTIONS[name](sizes, Budget(result.budget_s))
    except Exception as exc:  # noqa: BLE001 - the report records it; the next phase runs
        result.status, result.error = "failed", error_text(exc)
        traceback.print_exc()
    result.wall_s = time.monotonic() - start
    progress(f"phase {name}: {result.status} in {result.wall_s:.1f} s")
    return result


def write_report(path: Path, report: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(path)


def row_summary(row: dict) -> str:
    skip = {"check", "status", "tries"}
    parts = []
    for key, value in row.items():
        if key in skip:
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key}={value}")
    return " ".join(parts).replace("|", "/")[:300]


def markdown_table(report: dict) -> str:
    lines = ["| phase | check | status | figures |", "|---|---|---|---|"]
    for name, phase in report["phases"].items():
        lines.append(f"| {name} | (phase, {phase['wall_s']:.1f} s) | {phase['status']} | "
                     f"{(phase['error'] or '').replace('|', '/')[:200]} |")
        for row in phase["rows"]:
            lines.append(f"| {name} | {row.get('check', '')} | {row.get('status', '')} | "
                         f"{row_summary(row)} |")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_report.json"))
    parser.add_argument("--dry-run", action="store_true", help="the CPU at toy sizes")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every phase's time budget (e.g. 4 for --phases memory)")
    parser.add_argument("--fail-phase", default=None, help=argparse.SUPPRESS)  # tests only
    args = parser.parse_args(argv)
    args.phases = [p for p in args.phases.split(",") if p]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {', '.join(PHASES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_report: no CUDA device; use --dry-run for the CPU", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO / "plugins"))
    import diffusion_blocks  # noqa: F401 - registers the train specs
    from diffusion_blocks.train import use_single_process_env

    use_single_process_env()
    sizes = dry_sizes() if args.dry_run else gpu_sizes()
    sizes.budgets = {k: v * args.budget_scale for k, v in sizes.budgets.items()}
    start = time.monotonic()
    report = {"dry_run": args.dry_run, "device": sizes.device, "phases": {}, "total_wall_s": 0.0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.phases:
        report["phases"][name] = dataclasses.asdict(run_phase(name, sizes, args.fail_phase))
        report["total_wall_s"] = time.monotonic() - start
        write_report(args.out, report)
    print(markdown_table(report), flush=True)
    progress(f"total {report['total_wall_s']:.1f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
