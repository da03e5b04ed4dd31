"""The masked-diffusion LM (dblocks_md4): the masking process and ELBO weights, the
block partition of t, which layers run in training and sampling, the held-out BPC
estimator, the character data, and runs through the train loop (2 processes, resume,
the end-to-end twin)."""

import json
import math
import subprocess
import sys

import pytest
import torch

import _train_helpers as h
import diffusion_blocks  # noqa: F401  (registers the train specs)
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.config.sections import DiffusionBlocks
from diffusion_blocks.data.text import CharTokenizer, register_text_datasets
from diffusion_blocks.diffusion.masking import mask_tokens, MaskingSchedule
from diffusion_blocks.diffusion.partition import BlockPartition
from diffusion_blocks.errors import ConfigError
from diffusion_blocks.models.md4.args import MaskedDiffusionArgs
from diffusion_blocks.models.md4.evaluation import elbo_draw, heldout_bpc
from diffusion_blocks.models.md4.model import EndToEndMaskedDiffusionLM, MaskedDiffusionLM
from diffusion_blocks.models.md4.sampler import sample
from diffusion_blocks.models.md4.task import MaskedDiffusionTask
from diffusion_blocks.registry import resolve_run_spec

MD4_TOML = h.REPO / "train_configs" / "md4_chars.toml"
EXACT = MaskingSchedule("linear", eps=0.0)  # alpha_t = 1 - t exactly


def tiny_model(num_blocks=4, n_layers=4, conditioning="adaln_zero", end_to_end=False,
               seq_len=64, seed=0) -> MaskedDiffusionLM:
    partition = BlockPartition.from_config(
        DiffusionBlocks(num_blocks=num_blocks, overlap=0.0), n_layers, MaskingSchedule()
    )
    args = MaskedDiffusionArgs(
        dim=32, n_layers=n_layers, n_heads=4, vocab_size=257, max_seq_len=seq_len,
        partition=partition, time_conditioning=conditioning, adaln_cond_dim=16,
    )
    torch.manual_seed(seed)
    model = (EndToEndMaskedDiffusionLM if end_to_end else MaskedDiffusionLM)(args)
    model.init_weights()
    return model


def layer_call_log(model) -> list[list[int]]:
    """Per root forward, the layers that ran (hooks on every layer and the root)."""
    calls: list[list[int]] = []
    model.register_forward_pre_hook(lambda module, args: calls.append([]))
    for name, layer in model.layers.items():
        layer.register_forward_pre_hook(lambda module, args, i=int(name): calls[-1].append(i))
    return calls


# ---------------------------------------------------------------------------
# 1. The masking process and the ELBO weights, against hand-computed values


def test_linear_schedule_alpha_and_weight_are_one_minus_t_and_one_over_t():
    t = torch.tensor([0.1, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert EXACT.alpha(t).tolist() == pytest.approx([0.9, 0.75, 0.5, 0.0])
    assert EXACT.loss_weight(t).tolist() == pytest.approx([10.0, 4.0, 2.0, 1.0])
    # MD4's clip: alpha in [eps, 1 - eps]; at t = 0.5: 1.9996 / 1 - alpha = 0.5
    md4 = MaskingSchedule("linear")  # eps = 1e-4
    assert md4.alpha(torch.tensor([0.0, 0.5, 1.0])).tolist() == pytest.approx(
        [1 - 1e-4, 0.5, 1e-4], abs=1e-7)
    assert float(md4.loss_weight(torch.tensor(0.5))) == pytest.approx(0.9998 / 0.5)
    assert float(md4.loss_weight(torch.tensor(0.0))) == pytest.approx(0.9998 / 1e-4)


def test_cosine_and_polynomial_weights():
    cosine, poly2 = MaskingSchedule("cosine", eps=0.0), MaskingSchedule("poly2", eps=0.0)
    # cosine: alpha = 1 - cos(pi/2 (1 - t)), w = pi/2 tan(pi/2 (1 - t)); at t = 1/3:
    # alpha = 1 - cos(pi/3) = 1/2, w = pi/2 tan(pi/3) = pi sqrt(3) / 2
    third = torch.tensor(1 / 3, dtype=torch.float64)
    assert float(cosine.alpha(third)) == pytest.approx(0.5)
    assert float(cosine.loss_weight(third)) == pytest.approx(math.pi * math.sqrt(3) / 2)
    # poly2: alpha = 1 - t^2, w = 2t / t^2 = 2/t
    t = torch.tensor(0.5, dtype=torch.float64)
    assert float(poly2.alpha(t)) == pytest.approx(0.75)
    assert float(poly2.loss_weight(t)) == pytest.approx(4.0)


def test_unmask_probability_is_alpha_s_minus_alpha_t_over_one_minus_alpha_t():
    # linear, t = 0.5 -> s = 0.25: (0.75 - 0.5) / 0.5
    assert EXACT.unmask_probability(0.5, 0.25) == pytest.approx(0.5)
    assert EXACT.unmask_probability(1.0, 0.75) == pytest.approx(0.25)
    assert EXACT.unmask_probability(0.25, 0.0) == 1.0  # the last step unmasks the rest


def test_mask_tokens_masks_each_token_with_probability_one_minus_alpha():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (3, 20_000), generator=gen)
    z = mask_tokens(tokens, torch.tensor([1.0, 0.3, 0.0]), 256, gen)
    masked = z == 256
    assert masked[0].sum() == 0 and masked[2].all()
    n = tokens.shape[1]  # binomial: mean 0.7 n, sd sqrt(0.21 n)
    assert abs(int(masked[1].sum()) - 0.7 * n) < 5 * math.sqrt(0.21 * n)
    assert torch.equal(z[~masked], tokens[~masked])  # kept tokens are unchanged


class FixedLogits(torch.nn.Module):
    """A stand-in network with given logits, the masking schedule and the mask id."""

    def __init__(self, logits_BTV, schedule):
        super().__init__()
        self.logits_BTV = logits_BTV
        self.partition = BlockPartition((1,), (0.0, 1.0), 0.0, schedule)
        self.mask_token_id = logits_BTV.shape[-1] - 1

    def forward(self, z_BT, t_B, *, block):
        return self.logits_BTV


def test_loss_is_the_elbo_weight_times_the_masked_cross_entropy():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, 50), generator=gen)
    logits = torch.randn(2, 50, 257, generator=gen)
    logits[..., 256] = -math.inf
    t = torch.tensor([0.25, 0.8])
    model = FixedLogits(logits, EXACT)
    sums = MaskedDiffusionTask().denoiser_loss(
        model, {"input": tokens}, tokens, 0, t, torch.Generator().manual_seed(7))
    # the same masks, by hand
    z = mask_tokens(tokens, 1 - t, 256, torch.Generator().manual_seed(7))
    masked = z == 256
    assert 0 < int(masked.sum()) < tokens.numel()
    ce = -torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    by_hand = sum(
        (1 / float(t[b])) * float(ce[b][masked[b]].sum()) for b in range(2)
    )
    assert float(sums.loss_sum) == pytest.approx(by_hand, rel=1e-5)
    assert float(sums.unweighted_sum) == pytest.approx(float(ce[masked].sum()), rel=1e-5)
    assert int(sums.num_items) == int(masked.sum())  # the logged CE is per masked token


def test_a_prediction_ranges_over_the_data_tokens_only():
    """[MASK] is never predicted: a network with equal scores is uniform over the
    256 data tokens, so the CE of a masked token is ln 256 exactly (not ln 257)."""
    model = tiny_model()
    torch.nn.init.zeros_(model.output.weight)
    tokens = torch.randint(0, 256, (2, 32))
    logits = model(torch.full_like(tokens, model.mask_token_id), torch.tensor([0.9, 0.9]), block=0)
    assert torch.isneginf(logits[..., model.mask_token_id]).all()
    draw = elbo_draw(model, tokens, torch.tensor([0.6, 0.6]), 1, torch.Generator().manual_seed(0))
    ce_masked = draw.masked_ce_BT[draw.masked_BT]
    assert torch.allclose(ce_masked, torch.full_like(ce_masked, math.log(256)))


# ---------------------------------------------------------------------------
# 2. The partition of t


def test_blocks_cut_t_into_equal_decreases_of_alpha_block_zero_most_masked():
    partition = BlockPartition.from_config(DiffusionBlocks(num_blocks=4, overlap=0.0), 8,
                                           MaskingSchedule())
    assert partition.level_name == "t"
    assert partition.boundaries == pytest.approx((0.0, 0.25, 0.5, 0.75, 1.0))
    # flat: pytest.approx compares flat sequences only (pytest >= 9.2 refuses nesting)
    edges = [edge for b in range(4) for edge in partition.interval(b)]
    assert edges == pytest.approx([0.75, 1.0, 0.5, 0.75, 0.25, 0.5, 0.0, 0.25])
    # intervals own their upper end: t = 1 is block 0's, t = 0.75 block 1's
    t = torch.tensor([1.0, 0.8, 0.75, 0.5, 0.3, 0.01], dtype=torch.float64)
    assert partition.block_of_level(t).tolist() == [0, 0, 1, 2, 2, 3]
    # cosine, B = 2: alpha halves where cos(pi/2 (1 - t)) = 1/2, t = 1/3
    cosine = BlockPartition.from_config(DiffusionBlocks(num_blocks=2), 2, MaskingSchedule("cosine"))
    assert cosine.boundaries == pytest.approx((0.0, 1 / 3, 1.0))


def test_overlap_widens_the_t_interval_within_zero_and_one():
    partition = BlockPartition.from_config(DiffusionBlocks(num_blocks=4, overlap=0.1), 4,
                                           MaskingSchedule())
    assert partition.training_interval(1) == pytest.approx((0.475, 0.775))
    assert partition.training_interval(0) == pytest.approx((0.725, 1.0))
    assert partition.training_interval(3) == pytest.approx((0.0, 0.275))


def test_training_t_lies_in_the_block_interval_and_uniform_blocks_give_uniform_t():
    partition = BlockPartition.from_config(DiffusionBlocks(num_blocks=4, overlap=0.0), 4,
                                           MaskingSchedule())
    gen = torch.Generator().manual_seed(0)
    draws = []
    for block in torch.randint(0, 4, (2000,), generator=gen).tolist():
        t = partition.sample_training_levels(block, 8, gen)
        lo, hi = partition.interval(block)
        assert float(t.min()) > lo and float(t.max()) <= hi
        draws.append(t)
    t, _ = torch.sort(torch.cat(draws))
    n = len(t)  # Kolmogorov-Smirnov against U(0, 1), 0.1% level
    ks = float(torch.maximum(torch.arange(1, n + 1) / n - t, t - torch.arange(n) / n).max())
    assert ks < 1.95 / math.sqrt(n)


def test_masking_config_mistakes_are_one_line_errors(write_toml):
    for text, key in (
        ('masking_schedule = "cosine2"', "masking_schedule"),
        ('time_conditioning = "film"', "time_conditioning"),
    ):
        path = write_toml("bad.toml", f'extends = "{MD4_TOML}"\n[diffusion_blocks]\n{text}\n')
        with pytest.raises(ConfigError) as error:
            parse_job_config(["--job.config_file", str(path)])
        message = str(error.value)
        assert str(path) in message and key in message and "\n" not in message
    path = write_toml("bad.toml", f'extends = "{MD4_TOML}"\n[diffusion_blocks]\npartition = "uniform_log"\n')
    with pytest.raises(ConfigError, match=r"bad.toml: \[diffusion_blocks\] partition 'uniform_log'.*'equiprobable'"):
        resolve_run_spec(parse_job_config(["--job.config_file", str(path)]))



@pytest.mark.parametrize("model_toml, key, value", [
    (MD4_TOML, "sigma_max", "40.0"),                      # EDM's sigma: MD4 cuts t
    (MD4_TOML, "block0_sigma_sampling", '"log_uniform"'),  # an autoregressive-LM lever
    (h.REPO / "train_configs" / "llama3_debug.toml", "masking_schedule", '"cosine"'),
])
def test_a_key_the_family_never_reads_is_refused(write_toml, model_toml, key, value):
    path = write_toml("bad.toml", f'extends = "{model_toml}"\n[diffusion_blocks]\n{key} = {value}\n')
    with pytest.raises(ConfigError) as error:
        resolve_run_spec(parse_job_config(["--job.config_file", str(path)]))
    message = str(error.value)
    assert str(path) in message and f"{key} = " in message and "is not read by" in message


# ---------------------------------------------------------------------------
# 3. Only the owning block runs, in training and in sampling


@pytest.mark.parametrize("conditioning", ["adaln_zero", "none"])
def test_a_training_step_runs_and_trains_only_its_block(conditioning):
    model = tiny_model(num_blocks=4, n_layers=8, conditioning=conditioning)
    calls = layer_call_log(model)
    tokens = torch.randint(0, 256, (2, 32))
    for block in range(4):
        model.zero_grad(set_to_none=True)
        t = model.partition.sample_training_levels(block, 2, torch.Generator().manual_seed(block))
        sums = MaskedDiffusionTask().denoiser_loss(
            model, {"input": tokens}, tokens, block, t.float(), torch.Generator().manual_seed(0))
        sums.loss_sum.backward()
        owned = list(model.partition.layer_ranges[block])
        assert calls[-1] == owned
        with_grad = {int(n.split(".")[1]) for n, p in model.named_parameters()
                     if n.startswith("layers.") and p.grad is not None}
        assert sorted(with_grad) == owned


def test_sampling_runs_each_step_with_the_block_owning_its_t():
    model = tiny_model(num_blocks=4, n_layers=4)
    calls = layer_call_log(model)
    times = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: times.append(float(args[1][0])), with_kwargs=True)
    prompt = torch.tensor([104, 105])
    tokens = sample(model, 3, 24, 8, torch.Generator().manual_seed(0), prompt_T=prompt)
    # 8 steps on equal decreases of alpha from t = 1: two per block, blocks in order
    assert calls == [[0], [0], [1], [1], [2], [2], [3], [3]]
    assert times == pytest.approx([1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    for t, layers in zip(times, calls):
        lo, hi = model.partition.interval(layers[0])
        assert lo < t <= hi
    assert tokens.shape == (3, 24)
    assert (tokens != model.mask_token_id).all()  # nothing left masked
    assert (tokens[:, :2] == prompt).all()  # the prompt is kept


def test_end_to_end_twin_runs_every_layer_for_any_t():
    model = tiny_model(num_blocks=4, n_layers=4, end_to_end=True)
    assert model.partition.num_blocks == 1 and model.partition.boundaries == (0.0, 1.0)
    calls = layer_call_log(model)
    tokens = torch.randint(0, 256, (4, 16))
    gen = torch.Generator().manual_seed(0)
    MaskedDiffusionTask().end_to_end_loss(model, {"input": tokens}, tokens, {}, gen)
    sample(model, 1, 16, 4, gen)
    assert calls == [[0, 1, 2, 3]] * 5


# ---------------------------------------------------------------------------
# 4. The held-out BPC bound


def test_bpc_of_a_uniform_prediction_is_log2_of_the_data_vocabulary():
    """Uniform over the 256 data tokens ([MASK] excluded): 8 bits per character, up
    to MD4's clip of t (the bound's expectation is (1 - eps) * 8 = 7.9992)."""
    for num_blocks, end_to_end in ((4, False), (1, True)):
        model = tiny_model(num_blocks=num_blocks, n_layers=num_blocks, end_to_end=end_to_end,
                           seq_len=128)
        torch.nn.init.zeros_(model.output.weight)
        gen = torch.Generator().manual_seed(3)
        batches = [torch.randint(0, 256, (16, 128), generator=gen) for _ in range(2)]
        estimate = heldout_bpc(model, batches, torch.device("cpu"), seed=0)
        assert estimate.sequences == 32 and estimate.draws_per_sequence == 8
        assert 0 < estimate.stderr < 0.3
        assert abs(estimate.bpc - (1 - 1e-4) * 8) < 4 * estimate.stderr


def test_bpc_uses_the_owning_block_for_each_draw_of_t():
    model = tiny_model(num_blocks=4, n_layers=4)
    calls = layer_call_log(model)
    heldout_bpc(model, [torch.randint(0, 256, (4, 32))], torch.device("cpu"), seed=0,
                draws_per_sequence=8)
    # strata of t from 0 up: two per block, each run by its owner
    assert calls == [[3], [3], [2], [2], [1], [1], [0], [0]]
    with pytest.raises(ValueError, match="multiple of the model's 4 blocks"):
        heldout_bpc(model, [torch.randint(0, 256, (4, 32))], torch.device("cpu"),
                    draws_per_sequence=6)


# ---------------------------------------------------------------------------
# 5. Character data


def test_char_data_is_the_files_characters_in_order(tmp_path):
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    register_text_datasets()
    text = "First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n\n" * 40
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    tokenizer = CharTokenizer()
    assert tokenizer.get_vocab_size() == 256 and tokenizer.encode("ab", add_bos=True) == [97, 98]
    dataset = HuggingFaceTextDataset("text_chars", str(path), tokenizer, seq_len=63)
    stream = []
    for inputs, labels in dataset:  # torchtitan cuts seq_len + 1 tokens per sample
        stream += inputs["input"].tolist() + labels[-1:].tolist()
    assert bytes(stream) == text.encode()[: len(stream)] and len(text) - len(stream) < 64


# ---------------------------------------------------------------------------
# 6. Runs through the train loop: 2 processes, resume, the end-to-end twin

RUN_ARGS = [
    "--job.config_file", str(MD4_TOML), *h.TINY, "--validation.no_enable",
    "--checkpoint.interval", "2", "--metrics.no_enable_tensorboard", "--debug.seed", "0",
    "--lr_scheduler.warmup_steps", "2", "--lr_scheduler.decay_ratio", "0",
    "--training.device", "cpu",
]


def md4_run(folder, steps, nproc=2, *extra, record=True):
    proc = h.torchrun(
        [*RUN_ARGS, "--training.steps", str(steps), "--job.dump_folder", str(folder), *extra],
        nproc=nproc, record_dir=folder / "records" if record else None, timeout=420,
    )
    h.check_ok(proc)
    return proc


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("md4_fsdp")
    proc = md4_run(folder, 4)
    return folder, h.read_records(folder / "records", 2), h.output_of(proc)


def test_two_process_run_trains_one_block_of_t_on_every_rank(two_process_run):
    folder, records, output = two_process_run
    for record in records:
        assert record["world_size"] == 2 and record["finished_step"] == 4
        assert "MaskedDiffusionLM" in record["model_mro"]
        assert record["model_is_fsdp"] and record["fsdp_layers"] == 8
        assert record["dtensor_params"] == record["num_params"]
        for s in record["steps"]:
            start, stop = record["layer_ranges"][s["block"]]
            assert s["ran_layers"] == s["grad_layers"] == list(range(start, stop))
            assert math.isfinite(s["loss"]) and s["proposed_block"] == s["block"]
    assert [s["block"] for s in records[0]["steps"]] == [s["block"] for s in records[1]["steps"]]
    rows = h.training_rows(folder / "metrics.jsonl")
    # the level is t: its mean lies in the trained block's interval, named in the log
    for row in rows:
        lo, hi = 1 - (row[h.BLOCK] + 1) / 4, 1 - row[h.BLOCK] / 4
        assert lo < row[h.PREFIX + "t_mean"] <= hi and h.SIGMA not in row
    assert "t in [0.75, 1]" in output and "  t: " in output


def test_resume_reproduces_the_uninterrupted_two_process_run(two_process_run, tmp_path):
    reference, _, _ = two_process_run
    md4_run(tmp_path, 2, record=False)
    resumed = md4_run(tmp_path, 4, record=False)
    assert "Training starts at step 3" in h.output_of(resumed)
    got = h.training_rows(tmp_path / "metrics.jsonl")[2:]
    want = h.training_rows(reference / "metrics.jsonl")[2:]
    assert [r["step"] for r in got] == [3, 4]
    for a, b in zip(got, want):
        assert a[h.BLOCK] == b[h.BLOCK]
        for key in (h.LOSS, h.CE, h.PREFIX + "t_mean", h.GRAD_NORM):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_end_to_end_twin_is_one_switch_away_and_tools_read_its_checkpoint(tmp_path):
    folder = tmp_path / "e2e"
    md4_run(folder, 2, 1, "--diffusion_blocks.no_enable")
    (record,) = h.read_records(folder / "records", 1)
    assert record["model_mro"][0] == "EndToEndMaskedDiffusionLM"
    assert all(s["ran_layers"] == s["grad_layers"] == list(range(8)) for s in record["steps"])
    config = ["--job.config_file", str(MD4_TOML), "--diffusion_blocks.no_enable",
              "--training.seq_len", "32", "--validation.seq_len", "32",
              "--validation.local_batch_size", "4"]
    env = h.subprocess_env()
    bpc = subprocess.run(
        [sys.executable, "tools/eval_bpc.py", *config, "--checkpoint", str(folder / "checkpoint"),
         "--json", "--max-batches", "2"],
        cwd=h.REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bpc.returncode == 0, bpc.stderr
    result = json.loads(bpc.stdout.strip().splitlines()[-1])
    assert set(result) == {"bpc", "stderr", "sequences", "draws_per_sequence"}
    assert result["sequences"] == 8 and 0 < result["stderr"] < result["bpc"] < 20
    generated = subprocess.run(
        [sys.executable, "tools/generate.py", *config, "--checkpoint", str(folder / "checkpoint"),
         "--prompt", "the", "--max-new-tokens", "12", "--steps", "4", "--num-samples", "2", "--json"],
        cwd=h.REPO, env=env, capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr
    out = json.loads(generated.stdout.strip().splitlines()[-1])
    assert out["mode"] == "end-to-end" and len(out["samples"]) == 2
    assert all(s.startswith("the") for s in out["samples"])


def test_block_parallel_with_activation_checkpointing(tmp_path):
    """Two groups of one process, each training its own block every step (the shared
    block-parallel path), layers under torchtitan's activation checkpointing."""
    md4_run(tmp_path, 2, 2, "--diffusion_blocks.num_blocks", "2",
            "--diffusion_blocks.block_parallel", "--activation_checkpoint.mode", "full")
    records = h.read_records(tmp_path / "records", 2)
    for rank, record in enumerate(records):
        assert record["group"] == rank
        for s in record["steps"]:
            assert s["block"] == rank and math.isfinite(s["loss"])
            assert s["ran_layers"] == s["grad_layers"] == list(range(4 * rank, 4 * rank + 4))


def test_md4_report_trains_the_rows_and_writes_the_bpc_of_each_at_each_budget(tmp_path):
    """tools/reports/md4.py end to end at a toy size: end to end, DiffusionBlocks B = 2
    and the equal-memory model, two at a time, measured at half and all of their steps."""
    from diffusion_blocks.data.text import synthetic_sentences

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_sentences(400)) + "\n")
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "tools/reports/md4.py", "--data", str(corpus), "--out", str(out),
         "--steps", "2", "--warmup", "1", "--eval-batches", "1", "--num-samples", "1",
         "--num-blocks", "2", "--equal-memory-row", "--budgets", "0.5,1", "--parallel-runs", "2",
         "--training.seq_len", "32", "--training.local_batch_size", "2",
         "--validation.seq_len", "32", "--validation.local_batch_size", "2"],
        cwd=h.REPO, env=h.subprocess_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    results = report["results"]
    equal_memory = "end-to-end, chars_4l (equal memory, B=2)"
    assert {name: (r["steps"], r["updates_per_block"]) for name, r in results.items()} == {
        "end-to-end MD4": (2, 2), "DiffusionBlocks B=2": (4, 2), equal_memory: (2, 2)}
    for r in results.values():
        assert math.isfinite(r["bpc"]) and r["stderr"] >= 0 and len(r["samples"]) == 1
    assert {f: {n: r["step"] for n, r in row.items()} for f, row in report["budgets"].items()} == {
        "0.5": {"end-to-end MD4": 1, "DiffusionBlocks B=2": 2, equal_memory: 1},
        "1": {"end-to-end MD4": 2, "DiffusionBlocks B=2": 4, equal_memory: 2}}
    assert report["budgets"]["1"]["DiffusionBlocks B=2"]["bpc"] == results["DiffusionBlocks B=2"]["bpc"]
    for log in ("log_e2e.txt", "log_dblocks_b2.txt", "log_e2e_4l.txt"):
        assert (out / log).is_file()
    assert (out / "budgets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def md4_report_tool():
    """tools/reports/md4.py as a module (its sibling modules importable)."""
    import importlib.util
    reports = h.REPO / "tools" / "reports"
    if str(reports) not in sys.path:
        sys.path.insert(0, str(reports))
    spec = importlib.util.spec_from_file_location("md4_report", reports / "md4.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_md4_report_plans_b3_with_uneven_blocks_equal_memory_and_variants(tmp_path):
    tool = md4_report_tool()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be\n" * 20)
    args, extra = tool.parse_args([
        "--data", str(corpus), "--out", str(tmp_path), "--steps", "100", "--warmup", "10",
        "--num-blocks", "4,3", "--equal-memory-row", "--budgets", "0.25,0.5,1",
        "--checkpoint-interval", "10", "--variant", "no_time=--diffusion_blocks.time_conditioning none"])
    runs = tool.planned_runs(args, extra, tmp_path / "train.txt", tmp_path / "heldout.txt")
    assert {name: (run.dump, run.steps) for name, run in runs.items()} == {
        "end-to-end MD4": ("e2e", 100),
        "DiffusionBlocks B=4": ("dblocks_b4", 400), "DiffusionBlocks B=3": ("dblocks_b3", 300),
        "end-to-end, chars_2l (equal memory, B=4)": ("e2e_2l", 100),
        "end-to-end, chars_3l (equal memory, B=3)": ("e2e_3l", 100),
        "end-to-end MD4, no_time": ("e2e_no_time", 100),
        "DiffusionBlocks B=4, no_time": ("dblocks_b4_no_time", 400),
        "DiffusionBlocks B=3, no_time": ("dblocks_b3_no_time", 300),
    }
    b3 = tool.parse_job_config(runs["DiffusionBlocks B=3"].overrides)
    assert b3.diffusion_blocks.layers_per_block == [3, 3, 2] and b3.diffusion_blocks.num_blocks == 3
    assert b3.lr_scheduler.warmup_steps == 30
    for name, flavor in (("end-to-end, chars_3l (equal memory, B=3)", "chars_3l"),
                         ("end-to-end, chars_2l (equal memory, B=4)", "chars_2l")):
        job_config = tool.parse_job_config(runs[name].overrides)
        assert job_config.model.flavor == flavor and job_config.diffusion_blocks.num_blocks == 1
        assert not job_config.diffusion_blocks.enable
    for name in ("end-to-end MD4, no_time", "DiffusionBlocks B=4, no_time"):
        assert tool.parse_job_config(runs[name].overrides).diffusion_blocks.time_conditioning == "none"
    assert tool.parse_job_config(runs["DiffusionBlocks B=4"].overrides).diffusion_blocks.time_conditioning == "adaln_zero"
    # every budget step is a checkpoint step
    b4 = tool.parse_job_config(runs["DiffusionBlocks B=4"].overrides)
    assert b4.checkpoint.interval == 10 and b4.checkpoint.keep_latest_k == 0
    assert tool.block_layers(8, 3) == [3, 3, 2] and tool.block_layers(8, 4) == [2, 2, 2, 2]
    with pytest.raises(SystemExit):
        tool.parse_args(["--data", str(corpus), "--num-blocks", "0"])


def test_eval_bpc_refuses_held_out_sequences_longer_than_the_model_in_one_line():
    """[validation] seq_len beyond [training] seq_len (the position table) used to end
    in an assertion deep in torchtitan's rotary embedding."""
    proc = subprocess.run(
        [sys.executable, "tools/eval_bpc.py", "--job.config_file", "train_configs/md4_chars.toml",
         "--checkpoint", "missing", "--training.seq_len", "64", "--validation.seq_len", "128"],
        cwd=h.REPO, env=h.subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "[validation] seq_len = 128 is longer than [training] seq_len = 64, the longest "
        "sequence the model's position table covers; set it <= 64")


def test_the_trainer_refuses_a_validation_longer_than_training_only_when_validation_runs():
    from diffusion_blocks.config.loader import parse_job_config
    from diffusion_blocks.errors import ConfigError
    from diffusion_blocks.train import check_settings

    longer = ["--job.config_file", "train_configs/md4_chars.toml", "--training.seq_len", "64",
              "--validation.seq_len", "128"]
    with pytest.raises(ConfigError, match=r"\[validation\] seq_len = 128 is longer than \[training\] seq_len = 64"):
        check_settings(parse_job_config(longer), "cpu")
    check_settings(parse_job_config([*longer, "--validation.no_enable"]), "cpu")  # not read: fine


def test_md4_report_redraws_the_budget_plot_from_a_report_alone(tmp_path, capsys):
    """--plot-from: budgets.png from a report.json's budgets, no checkpoints; a file
    without budgets is refused in one line."""
    tool = md4_report_tool()
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"budgets": {
        f: {"end-to-end MD4": {"bpc": 3.0 + float(f)}, "DiffusionBlocks B=4": {"bpc": 3.1 + float(f)}}
        for f in ("0.25", "0.5", "1")}}))
    tool.main(["--plot-from", str(report), "--out", str(tmp_path / "plot")])
    assert (tmp_path / "plot" / "budgets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "DiffusionBlocks B=4" in (tmp_path / "plot" / "budgets.svg").read_text()
    report.write_text(json.dumps({"results": {}}))
    with pytest.raises(SystemExit) as stopped:
        tool.main(["--plot-from", str(report), "--out", str(tmp_path / "plot")])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: --plot-from {report}: no 'budgets'")
