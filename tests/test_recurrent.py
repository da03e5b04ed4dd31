"""The recurrent-depth LM (`dblocks_recurrent`): a prelude, one shared core applied r
times, a coda. DiffusionBlocks trains it with ONE core pass per step at a sigma from the
global truncated log-normal; the end-to-end twin (Huginn's recipe) draws r per step and
backpropagates through the last k iterations.

Models are built in this process (tiny, seconds); the trainer runs in this process for
the per-step counts and under torchrun for resume and the 2-process run. Run as a
script under torchrun, this file is a launcher that records, per rank and step, how
many times each layer ran (see `launch`).
"""

import json
import math
import os
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import _train_helpers as h
from diffusion_blocks import diffusion
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.errors import ConfigError
from diffusion_blocks.eval.memory import count_saved_activations
from diffusion_blocks.inference import single_process_parallel_dims
from diffusion_blocks.inference import build_model
from diffusion_blocks.models.llama3.sampler import DecodingConfig
from diffusion_blocks.models.llama3.task import LanguageModelTask
from diffusion_blocks.models.recurrent import sampler
from diffusion_blocks.models.recurrent.model import (
    draw_recurrence,
    ITERATION_SEED,
    RecurrentDenoiser,
    RecurrentTwin,
)
from diffusion_blocks.registry import resolve_run_spec

CONFIG = h.REPO / "train_configs" / "recurrent_debug.toml"
TWIN_CONFIG = h.REPO / "train_configs" / "recurrent_debug_e2e.toml"
SEQ_LEN = 16
RECORD_ENV = "RECURRENT_TEST_RECORD_DIR"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster than several fighting for shared cores
    (the launched runs get OMP_NUM_THREADS=1 from _train_helpers.subprocess_env)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def job_config(*extra: str, config: Path = CONFIG):
    return parse_job_config(
        ["--job.config_file", str(config), "--training.seq_len", str(SEQ_LEN), *extra]
    )


def build(*extra: str, config: Path = CONFIG, seed: int = 0):
    """The configured model as the trainer builds it (no parallelism), AdaLN weights
    made non-zero so that every layer acts (AdaLN-Zero starts them as the identity)."""
    torch.manual_seed(seed)
    model, _, _ = build_model(
        job_config(*extra, config=config), torch.device("cpu"),
        single_process_parallel_dims(), parallelize=lambda m: m,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaln" in name or "modulation" in name:
                p.normal_(std=0.05)
    return model


def tokens(batch: int = 2, seq_len: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def layer_part(model, layer_name: str) -> str:
    i = int(layer_name)
    args = model.model_args
    return "prelude" if i in args.prelude_ids else "core" if i in args.core_ids else "coda"


@contextmanager
def count_layer_calls(model):
    """Counter {layer name: forward calls} while active."""
    counts = Counter()
    handles = [
        layer.register_forward_pre_hook(lambda module, args, name=name: counts.update([name]))
        for name, layer in model.layers.items()
    ]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def calls_per_part(model, counts: Counter) -> dict[str, set[int]]:
    """{part: the set of call counts of its layers}: {'core': {r}} when every core layer
    ran r times."""
    parts: dict[str, set[int]] = {"prelude": set(), "core": set(), "coda": set()}
    for name in model.layers:
        parts[layer_part(model, name)].add(counts[name])
    return parts


# ---------------------------------------------------------------------------
# The train spec and its config


def test_spec_flavors_and_the_twin_are_one_switch_apart():
    denoiser = build()
    twin = build(config=TWIN_CONFIG)
    assert type(denoiser) is RecurrentDenoiser and type(twin) is RecurrentTwin
    args = denoiser.model_args
    assert (args.n_prelude_layers, args.n_core_layers, args.n_coda_layers) == (1, 2, 1)
    # one block over all of [sigma_min, sigma_max]: training sigmas are the global law
    assert denoiser.partition.num_blocks == 1
    assert denoiser.partition.training_interval(0) == (0.002, 80.0)
    # the same modules: identical weights' names and shapes (the twin adds its draw counter)
    shapes = {k: v.shape for k, v in denoiser.state_dict().items()}
    twin_shapes = {k: v.shape for k, v in twin.state_dict().items()}
    assert set(twin_shapes) - set(shapes) == {"recurrence_draws"}
    assert all(twin_shapes[k] == s for k, s in shapes.items())
    flavors = resolve_run_spec(job_config()).spec.model_args
    assert {"debugmodel", "debugmodel_2_4_2", "180M", "3.9B"} <= set(flavors)
    assert flavors["3.9B"].dim == 5280 and flavors["3.9B"].n_layers == 8


@pytest.mark.parametrize("flag, value, message", [
    ("diffusion_blocks.num_blocks", "4", r"\[diffusion_blocks\] num_blocks = 4: dblocks_recurrent trains ONE shared core"),
    ("recurrent.bptt_steps", "0", r"\[recurrent\] bptt_steps must be >= 1, got 0"),
    ("recurrent.mean_recurrence", "0", r"\[recurrent\] mean_recurrence must be >= 1"),
    ("recurrent.recurrence_law", "geometric", r"\[recurrent\] recurrence_law 'geometric' is not one of"),
])
def test_bad_values_are_one_line_config_errors(flag, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve_run_spec(job_config(f"--{flag}", value))
    assert f"--{flag}" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------
# One set of core weights, applied r times


@pytest.mark.parametrize("config", [CONFIG, TWIN_CONFIG], ids=["dblocks", "twin"])
def test_the_core_is_one_set_of_weights_applied_r_times(config):
    # the weights do not depend on r: models configured for r = 2 and r = 16 have the
    # same parameters, and exactly n_core_layers core layers
    small, large = (build("--diffusion_blocks.sampling_steps_per_block", str(r), config=config)
                    for r in (2, 16))
    assert [(k, v.shape) for k, v in small.named_parameters()] == [
        (k, v.shape) for k, v in large.named_parameters()]
    assert sum(layer_part(small, name) == "core" for name in small.layers) == 2
    model = small.eval()
    for r in (1, 3, 5):
        with count_layer_calls(model) as counts:
            sampler.generate(model, tokens(1, 4), DecodingConfig(max_new_tokens=1, steps_per_block=r),
                             SEQ_LEN)
        parts = calls_per_part(model, counts)
        # the same core modules run r times; the prelude once (its output is injected at
        # every iteration); the denoiser's coda is part of every Euler step, the twin's
        # reads the last iteration out once
        assert parts == {"prelude": {1}, "core": {r},
                         "coda": {r} if config == CONFIG else {1}}, (r, parts)


@pytest.mark.parametrize("config", [CONFIG, TWIN_CONFIG], ids=["dblocks", "twin"])
def test_generation_with_different_r(config):
    model = build(config=config).eval()
    prompt = tokens(2, 5)
    texts, logits = {}, {}
    for r in (1, 6):
        decoding = DecodingConfig(max_new_tokens=3, steps_per_block=r, seed=3)
        with count_layer_calls(model) as counts:
            texts[r] = sampler.generate(model, prompt, decoding, SEQ_LEN)
        assert calls_per_part(model, counts)["core"] == {3 * r}  # r iterations per token
        assert texts[r].shape == (2, 8) and torch.equal(texts[r][:, :5], prompt)
        assert 0 <= int(texts[r].min()) and int(texts[r].max()) < model.vocab_size
        logits[r] = sampler.next_token_logits(model, prompt, r, torch.Generator().manual_seed(0))
        assert logits[r].shape == (2, model.vocab_size) and torch.isfinite(logits[r]).all()
    # the seed fixes the text
    decoding = DecodingConfig(max_new_tokens=3, steps_per_block=6, seed=3)
    assert torch.equal(texts[6], sampler.generate(model, prompt, decoding, SEQ_LEN))
    # r matters: more iterations, other logits
    assert not torch.allclose(logits[1], logits[6])


def test_each_euler_step_uses_the_expected_clean_embedding(monkeypatch):
    model = build().eval()
    seen_logits, seen_denoised = [], []
    original_denoise, original_step = model.denoise, diffusion.euler_step

    def denoise(e, z, sigma):
        out = original_denoise(e, z, sigma)
        seen_logits.append(out.logits_BTV)
        return out

    def euler_step(z, denoised, sigma, sigma_next):
        seen_denoised.append(denoised)
        return original_step(z, denoised, sigma, sigma_next)

    monkeypatch.setattr(model, "denoise", denoise)
    monkeypatch.setattr(diffusion, "euler_step", euler_step)
    sampler.next_token_logits(model, tokens(1, 6), 3, torch.Generator().manual_seed(0))
    assert len(seen_logits) == len(seen_denoised) == 3
    table = torch.nn.functional.normalize(model.tok_embeddings.weight, dim=-1)
    for logits, denoised in zip(seen_logits, seen_denoised):
        torch.testing.assert_close(denoised, (torch.softmax(logits, -1) @ table).flatten(0, 1))


# ---------------------------------------------------------------------------
# Training: one core pass per step; the twin's r and truncated BPTT


def saved_bytes(model, **settings) -> int:
    """Bytes autograd saves for backward in one training forward + loss of `model`,
    with `settings` (model args: r and k) changed first."""
    for key, value in settings.items():
        setattr(model.model_args, key, value)
    model.train()
    task = LanguageModelTask()
    batch = tokens(1)
    generator = torch.Generator().manual_seed(0)
    with count_saved_activations(model) as counter:
        if isinstance(model, RecurrentDenoiser):
            task.denoiser_loss(model, {"input": batch}, batch, 0, torch.tensor([0.3]), generator)
        else:
            task.end_to_end_loss(model, {"input": batch}, batch, {}, generator)
    return counter.bytes


def test_saved_activations_do_not_grow_with_r_in_the_single_pass_recipe_and_do_in_bptt():
    # DiffusionBlocks: the training step is one core pass whatever r the model runs at
    # inference (and whatever the twin's settings)
    denoiser = build()
    single_pass = {
        r: saved_bytes(denoiser, inference_recurrence=r, mean_recurrence=r, bptt_steps=r)
        for r in (1, 4, 16)
    }
    assert len(set(single_pass.values())) == 1, single_pass

    model = build("--recurrent.recurrence_law", "fixed", config=TWIN_CONFIG)

    def twin(r, k):
        return saved_bytes(model, mean_recurrence=r, bptt_steps=k)

    # the twin: backpropagating through all r iterations, memory grows linearly with r
    full = {r: twin(r, r) for r in (1, 2, 4)}
    per_iteration = full[2] - full[1]
    assert per_iteration > 0.2 * full[1]
    assert full[4] - full[2] == pytest.approx(2 * per_iteration, rel=0.02)
    # truncated BPTT: it grows with k; the no_grad iterations before the last k cost nothing
    assert twin(6, 1) < twin(6, 2) < twin(6, 4)
    assert twin(6, 2) == twin(2, 2) == full[2]
    # one backpropagated iteration of the twin costs about the single-pass step
    assert full[1] == pytest.approx(single_pass[1], rel=0.1)


def test_recurrence_laws():
    g = torch.Generator().manual_seed(0)
    draws = [draw_recurrence("poisson_lognormal", 8, g) for _ in range(4000)]
    assert min(draws) >= 1 and sum(draws) / len(draws) == pytest.approx(8, rel=0.05)
    assert max(draws) > 16  # Huginn's heavy tail: some steps recur much longer
    uniform = Counter(draw_recurrence("uniform", 4, g) for _ in range(4000))
    assert set(uniform) == set(range(1, 8))
    assert {draw_recurrence("fixed", 5, g) for _ in range(10)} == {5}
    assert {draw_recurrence("poisson_lognormal", 1, g) for _ in range(10)} == {1}


def expected_twin_recurrences(args, draws: int) -> list[int]:
    """The r of the twin's first `draws` training forwards (seeded by seed and draw)."""
    return [
        draw_recurrence(args.recurrence_law, args.mean_recurrence, torch.Generator().manual_seed(
            ITERATION_SEED + 1_000_003 * args.seed + n))
        for n in range(draws)
    ]


@pytest.fixture
def make_trainer(process_group, tmp_path):
    from diffusion_blocks import train

    trainers = []

    def make(*args: str, config: Path = CONFIG):
        trainer = train.BlockwiseTrainer(parse_job_config([
            "--job.config_file", str(config), *h.TINY, "--training.steps", "10",
            "--job.dump_folder", str(tmp_path / f"trainer{len(trainers)}"),
            "--checkpoint.no_enable", "--metrics.no_enable_tensorboard", *args,
        ]))
        trainers.append(trainer)
        return trainer

    yield make
    for trainer in trainers:
        trainer.close()


def train_steps(trainer, n: int) -> list[Counter]:
    """n train_steps of the real trainer; the per-layer call counts of each."""
    data = trainer.batch_generator(trainer.dataloader)
    per_step = []
    for _ in range(n):
        trainer.step += 1
        with count_layer_calls(trainer.model) as counts:
            trainer.train_step(data)
        per_step.append(Counter(counts))
    return per_step


def test_training_runs_exactly_one_core_pass_per_step(make_trainer):
    # two microbatches per step (gradient accumulation): one core pass each
    trainer = make_trainer("--training.global_batch_size", "4")
    assert trainer.gradient_accumulation_steps == 2 and trainer.num_blocks == 1
    model = trainer.model
    for counts in train_steps(trainer, 3):
        assert calls_per_part(model, counts) == {"prelude": {2}, "core": {2}, "coda": {2}}
    # prelude, core, coda and every shared module are trained by that pass, every step
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_the_twin_draws_r_per_step_and_runs_the_core_r_times(make_trainer):
    trainer = make_trainer("--recurrent.mean_recurrence", "3", config=TWIN_CONFIG)
    model = trainer.model
    per_step = train_steps(trainer, 4)
    expected = expected_twin_recurrences(model.model_args, 4)
    assert [calls_per_part(model, c)["core"] for c in per_step] == [{r} for r in expected]
    assert all(calls_per_part(model, c)["coda"] == {1} for c in per_step)
    assert len(set(expected)) > 1, "precondition: r varies from step to step"
    assert int(model.recurrence_draws) == 4
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


VALIDATION = ["--validation.enable", "--validation.dataset", "synthetic_text", "--validation.steps",
              "2", "--validation.seq_len", "32", "--validation.local_batch_size", "2"]


@pytest.mark.parametrize("config", [CONFIG, TWIN_CONFIG], ids=["dblocks", "twin"])
def test_validation_runs_the_inference_recurrence_and_draws_nothing(make_trainer, config):
    trainer = make_trainer(*VALIDATION, "--diffusion_blocks.sampling_steps_per_block", "3",
                           config=config)
    model = trainer.model
    with count_layer_calls(model) as counts:
        trainer.validator.validate(trainer.model_parts, 1)
    rows = [json.loads(line) for line in
            (Path(trainer.job_config.job.dump_folder) / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if "validation_metrics/loss" in r]
    if config == CONFIG:
        # the denoiser's loss at sigmas from its one block (all of [sigma_min, sigma_max])
        assert calls_per_part(model, counts)["core"] == {2}  # one pass per held-out batch
        assert row["validation_metrics/block0/ce"] > 0
    else:
        # torchtitan's plain next-token loss, r = sampling_steps_per_block; the training
        # draws are untouched
        assert calls_per_part(model, counts) == {"prelude": {2}, "core": {6}, "coda": {2}}
        assert 0 < row["validation_metrics/loss"] < 10
        assert int(model.recurrence_draws) == 0


# ---------------------------------------------------------------------------
# Through the launcher: resume, two processes, tools/generate.py


def run_args(config: Path, folder: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--job.config_file", str(config), *h.TINY, "--training.steps", str(steps),
        "--job.dump_folder", str(folder), "--metrics.no_enable_tensorboard", "--debug.seed", "0",
        "--recurrent.mean_recurrence", "3",
        # an LR schedule independent of training.steps: 2 warmup steps, then constant
        "--lr_scheduler.warmup_steps", "2", "--lr_scheduler.decay_ratio", "0", *extra,
    ]


@pytest.mark.parametrize("config", [CONFIG, TWIN_CONFIG], ids=["dblocks", "twin"])
def test_resume_reproduces_the_uninterrupted_run(config, tmp_path):
    checkpointing = ["--checkpoint.enable", "--checkpoint.interval", "2"]
    reference = tmp_path / "reference"
    h.check_ok(h.torchrun(run_args(config, reference, 4, *checkpointing)))
    resumed = tmp_path / "resumed"
    h.check_ok(h.torchrun(run_args(config, resumed, 2, *checkpointing)))
    proc = h.torchrun(run_args(config, resumed, 4, *checkpointing))
    h.check_ok(proc)
    assert "Training starts at step 3" in h.output_of(proc)
    want = h.training_rows(reference / "metrics.jsonl")
    got = h.training_rows(resumed / "metrics.jsonl")
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for key in (h.LOSS, h.CE, h.GRAD_NORM):
        # the twin: the draw counter is in the checkpoint, so steps 3-4 draw the same r
        assert [m[key] for m in got] == pytest.approx([m[key] for m in want], rel=1e-5), key

    # tools/generate.py dispatches through the family; r chosen on the command line
    out = subprocess.run(
        [sys.executable, str(h.REPO / "tools" / "generate.py"), "--job.config_file", str(config),
         "--training.seq_len", "32", "--checkpoint", str(resumed / "checkpoint"),
         "--prompt", "the cat", "--max-new-tokens", "4", "--recurrence", "3"],
        cwd=h.REPO, env=h.subprocess_env(), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    mode = "DiffusionBlocks" if config == CONFIG else "end-to-end"
    assert f"[{mode} model from {resumed / 'checkpoint' / 'step-4'}]" in out.stdout
    assert out.stdout.splitlines()[-1].startswith("the cat")


@pytest.mark.parametrize("config", [CONFIG, TWIN_CONFIG], ids=["dblocks", "twin"])
def test_two_process_run(config, tmp_path):
    folder = tmp_path / "run"
    records = tmp_path / "records"
    env = h.subprocess_env()
    env[RECORD_ENV] = str(records)
    proc = h.torchrun_script(
        [__file__, *run_args(config, folder, 4, *h.CPU, "--checkpoint.no_enable")], 2, env=env
    )
    h.check_ok(proc)
    rank0, rank1 = (json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2 and rank0["fsdp"]
    # every rank ran the same layers the same number of times in every step
    assert rank0["calls"] == rank1["calls"] and len(rank0["calls"]) == 4
    core = [str(i) for i in rank0["core_ids"]]
    core_calls = [{step[name] for name in core} for step in rank0["calls"]]
    if config == CONFIG:
        assert core_calls == [{1}] * 4  # one core pass per step on each rank
    else:
        # the same r on every rank (seeded identically), the law's draws
        assert core_calls == [{r} for r in rank0["expected_recurrences"]]
    rows = h.training_rows(folder / "metrics.jsonl")
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(m[h.LOSS]) for m in rows)


# ---------------------------------------------------------------------------
# The launcher (runs inside each torchrun worker of test_two_process_run)


def launch(argv: list[str]) -> None:
    """diffusion_blocks.train.main(argv) with a trainer that records, per step, how many
    times each layer ran on this rank."""
    from torch.distributed.fsdp import FSDPModule

    from diffusion_blocks import train

    records = Path(os.environ[RECORD_ENV])
    records.mkdir(parents=True, exist_ok=True)

    class RecordingTrainer(train.BlockwiseTrainer):
        def train_step(self, data_iterator):
            with count_layer_calls(self.model) as counts:
                super().train_step(data_iterator)
            self.calls.append(dict(counts))

        def train(self):
            self.calls = []
            super().train()
            args = self.model.model_args
            record = {
                "world_size": torch.distributed.get_world_size(),
                "fsdp": isinstance(self.model, FSDPModule),
                "calls": self.calls, "core_ids": list(args.core_ids),
                "expected_recurrences": expected_twin_recurrences(args, len(self.calls)),
            }
            (records / f"rank{self.rank}.json").write_text(json.dumps(record))

    train.BlockwiseTrainer = RecordingTrainer
    train.main(argv)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    launch(sys.argv[1:])


def test_recurrent_report_writes_quality_per_r(tmp_path):
    """tools/reports/recurrent.py end to end at a toy size: both recipes and the judge
    trained, every r evaluated, report.json with its keys."""
    from diffusion_blocks.data.text import synthetic_sentences

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_sentences(300)) + "\n")
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(h.REPO / "tools" / "reports" / "recurrent.py"), "--data", str(corpus),
         "--out", str(out), "--steps", "2", "--warmup", "1", "--recurrences", "1,3",
         "--windows", "1", "--prompts", "2", "--prompt-len", "8", "--new-tokens", "4",
         "--chains", "4", "--split-draws", "1", "--ce-windows", "2",
         "--training.seq_len", "16", "--training.local_batch_size", "2"],
        cwd=h.REPO, env=h.subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["recurrences"] == [1, 3] and math.isfinite(report["real_text_judge_ce"])
    assert set(report["rows"]) == {"dblocks", "twin"}
    # the twin's step runs extra core passes: more FLOPs a step than the single pass
    assert report["train_flops_per_step"]["twin"] > report["train_flops_per_step"]["dblocks"] > 0
    assert (out / "judge" / "checkpoint" / "step-2").is_dir()
    for recipe in ("dblocks", "twin"):
        row = report["rows"][recipe]
        assert row["recipe"] == recipe and row["steps"] == 2
        assert row["train_flops"] == 2 * report["train_flops_per_step"][recipe]
        per_r = row["per_r"]
        assert set(per_r) == {"1", "3"}
        for figures in per_r.values():
            assert 0 <= figures["p_true_next"] <= 1 and math.isfinite(figures["judge_ce"])
            assert math.isfinite(figures["sampler_ce"]) and figures["sampler_ce"] > 0
            # the denoiser's ancestral chains run in pairs (one split draw): K/2 and K
            expected_k = {"2", "4"} if recipe == "dblocks" else {"1", "2", "4"}
            assert set(figures["sampler_ce_by_chains"]) == expected_k
            assert figures["sampler_ce_by_chains"]["4"] == figures["sampler_ce"]
    # --skip-training evaluates what is there: the longer run, never trained, is left out
    again = subprocess.run(
        [*proc.args, "--skip-training", "--longer-factor", "2", "--no-samples", "--recurrences", "1"],
        cwd=h.REPO, env=h.subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "dblocks, 2x steps: no checkpoint" in again.stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report["rows"]) == {"dblocks", "twin"} and "real_text_judge_ce" not in report
    assert not (out / "dblocks_2x").exists()
    # the same settings again: both rows kept from report.json, not evaluated again
    third = subprocess.run(again.args, cwd=h.REPO, env=h.subprocess_env(), capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stdout.count("evaluated already with these settings, kept") == 2
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"]
    # --row: only the named row evaluated (new settings: r = 3); the other one, not held
    # for these settings, left out ...
    fourth = subprocess.run([*again.args, "--recurrences", "3", "--row", "twin"], cwd=h.REPO,
                            env=h.subprocess_env(), capture_output=True, text=True, timeout=600)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    assert "dblocks: not a --row, left out" in fourth.stdout
    twin_only = json.loads((out / "report.json").read_text())["rows"]
    assert set(twin_only) == {"twin"} and set(twin_only["twin"]["per_r"]) == {"3"}
    # ... and carried over, not evaluated again, once the report holds it
    fifth = subprocess.run([*again.args, "--recurrences", "3", "--row", "dblocks"], cwd=h.REPO,
                           env=h.subprocess_env(), capture_output=True, text=True, timeout=600)
    assert fifth.returncode == 0, fifth.stderr[-3000:]
    assert "twin: not a --row, carried over from the report" in fifth.stdout
    both = json.loads((out / "report.json").read_text())["rows"]
    assert set(both) == {"twin", "dblocks"} and both["twin"] == twin_only["twin"]
    assert set(both["dblocks"]["per_r"]) == {"3"}


def recurrent_report_tool():
    sys.path.insert(0, str(h.REPO / "tools" / "reports"))
    import recurrent as tool
    return tool


@pytest.mark.parametrize("factor, expected", [
    (3, ("dblocks_3x", None)),            # the twin's FLOPs fall inside the longer run
    (1, ("dblocks_equal_compute", None)),  # no longer run: a run of its own
])
def test_recurrent_report_plans_the_equal_compute_and_longer_rows(tmp_path, factor, expected):
    """--equal-compute-row reads the DiffusionBlocks run at the twin's training FLOPs:
    the --longer-factor run's nearest checkpoint when the step lies inside it, else a
    run of that many steps; --longer-factor F trains F x the steps and warmup, and
    --twin-longer-factor F the twin likewise."""
    tool = recurrent_report_tool()
    args, config_args = tool.parse_args([
        "--steps", "40", "--warmup", "4", "--checkpoint-interval", "10", "--equal-compute-row",
        "--longer-factor", str(factor), "--twin-longer-factor", str(factor),
        "--training.seq_len", "16", "--training.local_batch_size", "2"])
    rows, flops = tool.planned_rows(args, config_args, tmp_path / "train.txt", tmp_path)
    ratio = flops["twin"] / flops["dblocks"]
    assert 1 < ratio < 3
    equal = rows["dblocks, equal compute"]
    assert equal.run.dump == expected[0] and equal.recipe == "dblocks"
    if factor == 3:
        longer = rows["dblocks, 3x steps"]
        assert longer.run.steps == longer.step == 120
        assert longer.run.overrides[longer.run.overrides.index("--lr_scheduler.warmup_steps") + 1] == "12"
        assert equal.run is longer.run and equal.step % 10 == 0
        assert abs(equal.step - 40 * ratio) <= 5
        twin_longer = rows["twin, 3x steps"]
        assert twin_longer.recipe == "twin" and twin_longer.run.dump == "twin_3x"
        assert twin_longer.run.steps == twin_longer.step == 120
        overrides = twin_longer.run.overrides
        assert overrides[overrides.index("--lr_scheduler.warmup_steps") + 1] == "12"
        assert overrides.count("--diffusion_blocks.no_enable") == 1
        # the longer twin's FLOPs lie past the longer run: a run of its own
        equal_longer = rows["dblocks, equal compute to the 3x steps twin"]
        assert equal_longer.recipe == "dblocks" and equal_longer.run.dump == "dblocks_equal_compute_3x"
        assert equal_longer.step == equal_longer.run.steps == round(120 * ratio)
        overrides = equal_longer.run.overrides
        assert overrides[overrides.index("--lr_scheduler.warmup_steps") + 1] == str(round(4 * round(120 * ratio) / 40))
        assert "--diffusion_blocks.no_enable" not in overrides
    else:
        assert equal.step == equal.run.steps == round(40 * ratio)
        assert not any(name.startswith("twin, ") for name in rows)
    assert set(rows) >= {"dblocks", "twin"}
    assert rows["twin"].run.overrides.count("--diffusion_blocks.no_enable") == 1


def test_recurrent_report_row_names_a_planned_row_or_is_refused(tmp_path):
    """--row keeps the named rows in plan order; a name that is not a row is one
    ConfigError naming the rows there are."""
    from diffusion_blocks.errors import ConfigError

    tool = recurrent_report_tool()
    args, config_args = tool.parse_args([
        "--steps", "40", "--warmup", "4", "--twin-longer-factor", "3", "--row", "twin, 3x steps",
        "--row", "twin", "--training.seq_len", "16", "--training.local_batch_size", "2"])
    rows, _ = tool.planned_rows(args, config_args, tmp_path / "train.txt", tmp_path)
    assert list(tool.selected(rows, args.row)) == ["twin", "twin, 3x steps"]
    assert tool.selected(rows, None) == rows
    with pytest.raises(ConfigError, match=r"--row 'twin 3x'.*the rows are 'dblocks', 'twin', 'twin, 3x steps'"):
        tool.selected(rows, ["twin 3x"])


def test_recurrent_report_budgets_read_each_row_at_its_nearest_checkpoint(tmp_path):
    """--budgets: each row again at every fraction < 1 of its own steps, read from its
    run's checkpoint nearest that step; fractions outside (0, 1] or without 1 refused."""
    tool = recurrent_report_tool()
    args, config_args = tool.parse_args([
        "--steps", "40", "--warmup", "4", "--checkpoint-interval", "10", "--budgets", "0.25,1",
        "--longer-factor", "3", "--equal-compute-row",
        "--training.seq_len", "16", "--training.local_batch_size", "2"])
    planned, _ = tool.planned_rows(args, config_args, tmp_path / "train.txt", tmp_path)
    rows = tool.with_budgets(planned, args)
    assert list(rows)[:2] == ["dblocks", "dblocks at 0.25"]
    assert rows["dblocks at 0.25"] == tool.Row("dblocks", planned["dblocks"].run, 10)
    assert rows["twin at 0.25"].step == 10 and rows["twin at 0.25"].run is planned["twin"].run
    assert rows["dblocks, 3x steps at 0.25"].step == 30
    # the equal-compute row reads step ~70 of the 3x run, which saves every 10: 17.5 -> 20
    equal = planned["dblocks, equal compute"]
    assert equal.step % 10 == 0 and (equal.step / 4) % 10
    assert rows["dblocks, equal compute at 0.25"].step == 10 * round(equal.step / 40)
    assert len(rows) == 2 * len(planned)
    for bad in ("0.5", "0,1", "1.5,1", "half,1"):
        with pytest.raises(SystemExit):
            tool.parse_args(["--budgets", bad])


def test_recurrent_report_scores_the_denoiser_with_the_chosen_sampler():
    """--sampler: the denoiser's teacher-forced figures and its sampler CE run the chain
    that sampler takes (Euler and ancestral chains differ at r = 3), draws are split
    only for ancestral, and the sampler is part of the evaluation settings."""
    from diffusion_blocks.models.recurrent.sampler import sequence_logits

    tool = recurrent_report_tool()
    with pytest.raises(SystemExit):  # 4 chains, 2^4 split draws: refused for ancestral
        tool.parse_args(["--chains", "4"])
    model = build().eval()
    windows_BS = torch.randint(0, model.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    figures = {}
    for sampler in ("euler", "ancestral"):
        args, _ = tool.parse_args(["--sampler", sampler, "--chains", "4" if sampler == "euler" else "16"])
        args.recurrence_list = [3]  # main() sets it from --recurrences
        assert tool.evaluation_settings(args)["sampler"] == sampler
        p_true, ce = tool.teacher_forced(model, windows_BS, 3, sampler)
        logits = sequence_logits(model, windows_BS[:, :-1], 3, torch.Generator().manual_seed(0),
                                 token_sampler=sampler)
        true_BT = torch.log_softmax(logits.float(), -1).gather(-1, windows_BS[:, 1:, None]).squeeze(-1)
        assert p_true == pytest.approx(float(true_BT.exp().mean()), rel=1e-5)
        assert ce == pytest.approx(float(-true_BT.mean()), rel=1e-5)
        result = tool.sampler_ce_at(model, "dblocks", windows_BS, 3, args)
        assert (result["split_draws"] > 0) == (sampler == "ancestral")
        figures[sampler] = (p_true, ce)
    assert figures["euler"] != figures["ancestral"]


# ---------------------------------------------------------------------------
# The sampler's held-out CE of the recurrent denoiser (eval.sampler_ce)


@pytest.mark.parametrize("sampler_name, r", [("euler", 3), ("heun", 2), ("ancestral", 3)])
def test_sampler_ce_of_one_chain_is_the_ce_of_the_last_pass_of_sequence_logits(sampler_name, r):
    """One chain: the estimator scores exactly the logits the recurrent sampler decodes
    from at every position (`sequence_logits` with the same generator seed); its
    profile reads the logits each of the r steps starts from (and Heun's last pass)."""
    from diffusion_blocks.eval.sampler_ce import sampler_heldout_ce
    from diffusion_blocks.models.llama3.sampler import DecodingConfig
    from diffusion_blocks.models.recurrent.sampler import sequence_logits

    model = build().eval()
    windows_BT = tokens(batch=2, seq_len=SEQ_LEN + 1)
    config = DecodingConfig(sampler=sampler_name, steps_per_block=r)
    result = sampler_heldout_ce(model, windows_BT, config, chains=1, seed=3)
    logits_BTV = sequence_logits(model, windows_BT[:, :-1], r, torch.Generator().manual_seed(3),
                                 token_sampler=sampler_name)
    log_probs_BT = torch.log_softmax(logits_BTV.double(), -1).gather(-1, windows_BT[:, 1:, None])
    assert result.ce == pytest.approx(float(-log_probs_BT.mean()), abs=1e-5)
    assert len(result.profile) == r + (sampler_name == "heun")
    assert {p.block for p in result.profile} == {0}


def test_split_draws_of_the_recurrent_chain_count_its_steps():
    from diffusion_blocks.eval.sampler_ce import sampler_heldout_ce
    from diffusion_blocks.models.llama3.sampler import DecodingConfig

    model = build().eval()
    windows_BT = tokens(batch=1, seq_len=SEQ_LEN + 1)
    result = sampler_heldout_ce(model, windows_BT, DecodingConfig(sampler="ancestral", steps_per_block=2),
                                chains=8, split_draws=3)
    assert result.split_draws == 2 and result.chains == 8 and math.isfinite(result.ce)
    with pytest.raises(ValueError, match="neither stop_sigma nor churn"):
        sampler_heldout_ce(model, windows_BT, DecodingConfig(churn=1.0), chains=1)
