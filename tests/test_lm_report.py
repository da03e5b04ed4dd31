"""tools/reports/lm.py and the measures it reports (diffusion_blocks.eval.text and
diffusion_blocks.models.llama3.evaluation)."""

import copy
import importlib.util
import json
import math
import shutil
import sys

import pytest
import torch

import diffusion_blocks  # noqa: F401
from diffusion_blocks.data.text import synthetic_sentences
from diffusion_blocks.eval import text as text_metrics
from diffusion_blocks.eval.ngram import judge_ce_on_bytes, NgramLM
from diffusion_blocks.models.llama3 import evaluation
from diffusion_blocks.models.llama3.args import dblocks_llama3_flavors
from diffusion_blocks.models.llama3.model import Denoised
from diffusion_blocks.models.llama3.sampler import owner_of
from test_llama_model import make_model, SEQ
from _train_helpers import REPO

SAMPLE_KEYS = {"model", "decoding", "judge_ce", "distinct_1", "distinct_2", "distinct_3",
               "unigram_entropy", "mauve", "example"}


def test_distinct_n_and_unigram_entropy_match_hand_counts():
    sequences = [[1, 2, 1, 2], [1, 2, 3]]
    # unigrams 1 2 1 2 1 2 3: 3 distinct of 7; bigrams 12 21 12 | 12 23: 3 of 5;
    # trigrams 121 212 | 123: 3 of 3
    assert text_metrics.distinct_n(sequences, 1) == pytest.approx(3 / 7)
    assert text_metrics.distinct_n(sequences, 2) == pytest.approx(3 / 5)
    assert text_metrics.distinct_n(sequences, 3) == pytest.approx(1.0)
    # counts 3, 3, 1 of 7
    hand = 2 * (3 / 7) * math.log(7 / 3) + (1 / 7) * math.log(7)
    assert text_metrics.unigram_entropy(sequences) == pytest.approx(hand)


def favour(next_BT: torch.Tensor, vocab: int, margin: float) -> torch.Tensor:
    """Logits (B, T, V) that put `margin` on next_BT[b, t] and 0 elsewhere."""
    logits_BTV = torch.zeros(*next_BT.shape, vocab)
    logits_BTV.scatter_(-1, next_BT[..., None], margin)
    return logits_BTV


def ce_of_margin(margin: float, vocab: int) -> float:
    """-log softmax at the favoured token, by hand."""
    return math.log(math.exp(margin) + vocab - 1) - margin


def test_judge_ce_scores_each_continuation_token_given_what_precedes_it():
    vocab, margin = 11, 2.0
    gen = torch.Generator().manual_seed(0)
    prompts, continuations = (torch.randint(0, vocab, (3, n), generator=gen) for n in (5, 4))
    full = torch.cat([prompts, continuations], dim=1)

    def judge(tokens_BT):  # favours the true next token of every position it is given
        return favour(full[:, 1:tokens_BT.shape[1] + 1], vocab, margin)

    assert text_metrics.judge_ce(judge, prompts, continuations) == pytest.approx(ce_of_margin(margin, vocab))


@pytest.mark.parametrize("sigma", [80.0, 0.2])
def test_teacher_forced_ce_is_the_owning_blocks_ce_on_an_uninformative_input(monkeypatch, sigma):
    model = make_model(num_blocks=2)
    vocab, margin = model.tok_embeddings.weight.shape[0], 1.5
    windows = torch.randint(0, vocab, (4, SEQ + 1), generator=torch.Generator().manual_seed(1))
    tokens, labels = windows[:, :-1], windows[:, 1:]
    seen = []

    def denoise(tokens_BT, z_BTD, sigma_B, block, self_cond_BTD=None):
        seen.append((z_BTD, sigma_B, block))
        return Denoised(z_BTD, favour(labels, vocab, margin))

    monkeypatch.setattr(model, "denoise", denoise)
    ce = evaluation.teacher_forced_denoising_ce(
        model, tokens, labels, sigma, torch.Generator().manual_seed(0)
    )
    assert ce == pytest.approx(ce_of_margin(margin, vocab), rel=1e-5)
    ((z_BTD, sigma_B, block),) = seen
    assert block == owner_of(model.partition, sigma) and torch.all(sigma_B == sigma)
    assert abs(z_BTD.std() / sigma - 1) < 0.05  # pure noise at sigma: nothing of the label


def test_single_block_continuations_draw_from_the_owning_block_alone(monkeypatch):
    """Every token comes from one call of the block owning sigma on the context so far,
    its noisy row pure noise at sigma; the draw follows that block's logits."""
    model = make_model(num_blocks=2)
    vocab = model.tok_embeddings.weight.shape[0]
    prompts = torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(1))
    seen = []

    def denoise(tokens_BT, z_BTD, sigma_B, block, self_cond_BTD=None):
        seen.append((tokens_BT.clone(), z_BTD[:, -1], sigma_B, block))
        # the token favoured: (last context token + 1) mod vocab, by a wide margin
        favoured = (tokens_BT[:, -1:] + 1).expand(-1, tokens_BT.shape[1]) % vocab
        return Denoised(z_BTD, favour(favoured, vocab, 50.0))

    monkeypatch.setattr(model, "denoise", denoise)
    new = evaluation.single_block_continuations(model, prompts, 80.0, 4, max_context=6)
    expected = (prompts[:, -1:] + torch.arange(1, 5)) % vocab
    assert torch.equal(new, expected)
    assert len(seen) == 4
    for step, (context, z_BD, sigma_B, block) in enumerate(seen):
        assert block == owner_of(model.partition, 80.0) == 0 and torch.all(sigma_B == 80.0)
        assert context.shape[1] == min(5 + step, 6)  # the window of max_context tokens
        assert abs(z_BD.std() / 80.0 - 1) < 0.1


def test_mauve_tells_one_distribution_from_another():
    gen = torch.Generator().manual_seed(0)
    p, q, far = (torch.randn(40, 8, generator=gen) + shift for shift in (0.0, 0.0, 3.0))
    assert text_metrics.mauve_score(p, q) > 0.9
    assert text_metrics.mauve_score(p, far) < 0.1


REPORTS = REPO / "tools" / "reports"


def load_tool():
    """tools/reports/lm.py, loaded as `python tools/reports/lm.py` runs it: its folder
    on sys.path (it imports the reports' `common`)."""
    if str(REPORTS) not in sys.path:
        sys.path.insert(0, str(REPORTS))
    spec = importlib.util.spec_from_file_location("lm_report", REPORTS / "lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAMPLER_CE_KEYS = {"model", "sampler", "steps_per_block", "chains", "windows", "positions",
                   "ce", "stderr", "ce_by_chains", "floor_fraction", "e2e_ce", "gap_pct",
                   "split_draws", "profile", "block_end_ce", "block_loss", "best_stop"}


def test_lm_report_writes_the_documented_keys(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_sentences(300)) + "\n")
    out = tmp_path / "report"
    tool = load_tool()
    # every window the sampler CE and its twin's CE are computed on, by id
    seen = {"sampler": [], "twin": [], "ngram": []}
    real_sampler_ce, real_twin = tool.sampler_heldout_ce, tool.next_token_ce

    def spy_sampler_ce(model, windows, *a, twin=None, **k):
        seen["sampler"].append(windows.clone())
        return real_sampler_ce(model, windows, *a, twin=twin, **k)

    real_ngram = tool.judge_ce_on_bytes

    def spy_ngram(model, prompts, continuations):
        seen["ngram"].append((prompts.clone(), continuations.clone()))
        return real_ngram(model, prompts, continuations)

    monkeypatch.setattr(tool, "sampler_heldout_ce", spy_sampler_ce)
    monkeypatch.setattr(tool, "judge_ce_on_bytes", spy_ngram)
    argv = [
        "--data", str(corpus), "--out", str(out), "--steps", "2", "--warmup", "1",
        "--num-blocks", "2", "--samplers", "ancestral,euler", "--steps-per-block", "1,2",
        "--temperatures", "1.0", "--sigmas", "80,0.2", "--prompts", "4", "--prompt-len", "8",
        "--new-tokens", "4", "--eval-windows", "2", "--chains", "2", "--chains-per-call", "2",
        "--split-draws", "1", "--ce-windows", "3", "--judge-chains", "2", "--equal-memory-row", "--budgets", "0.5,1",
        "--training.seq_len", "16", "--training.local_batch_size", "2",
        "--checkpoint.last_save_model_only",
    ]
    tool.main(argv)
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"args", "sampler_ce", "end_to_end_ce", "samples", "teacher_forced", "budgets"}
    dblocks = "DiffusionBlocks B=2"
    equal_memory = "end-to-end, debugmodel_4l (equal memory)"
    # the headline: every sampler x steps per block, every field, the twin on the same windows
    assert set(report["sampler_ce"]) == {f"{dblocks} {s} {n}/block" for s in ("ancestral", "euler")
                                         for n in (1, 2)}
    for row in report["sampler_ce"].values():
        assert set(row) == SAMPLER_CE_KEYS
        assert row["chains"] == 2 and row["windows"] == 3 and row["positions"] == 3 * 16
        # the ancestral rows: one group of 2 chains (its first draw split); euler: 1 and 2
        split = row["sampler"] == "ancestral"
        assert row["split_draws"] == (1 if split else 0)
        assert set(row["ce_by_chains"]) == ({"2"} if split else {"1", "2"})
        assert row["ce_by_chains"]["2"] == row["ce"]
        assert len(row["profile"]) == 2 * row["steps_per_block"] + 1
        assert row["profile"][-1]["ce"] == row["ce"] and row["profile"][0]["block"] == 0
        assert set(row["block_end_ce"]) == {"0", "1"} and row["block_loss"]["0"] == 0
        assert row["best_stop"]["ce"] == min(p["ce"] for p in row["profile"])
        assert math.isfinite(row["ce"]) and 0 <= row["floor_fraction"] <= 1
        assert row["gap_pct"] == pytest.approx(100 * (row["ce"] - row["e2e_ce"]) / row["e2e_ce"])
    headline_windows = seen["sampler"][:4]
    assert all(w.shape == (3, 17) for w in headline_windows)  # not the 2 --eval-windows
    assert all(torch.equal(w, headline_windows[0]) for w in headline_windows)
    # the twin's CE in the row is the end-to-end model's on those very windows
    e2e, _, _ = tool.load(tool.planned_runs(*tool.parse_args([
        "--data", str(corpus), "--out", str(out), "--steps", "2", "--warmup", "1",
        "--num-blocks", "2", "--training.seq_len", "16", "--training.local_batch_size", "2"]),
        out / "train.txt")["end-to-end"].overrides)
    w = headline_windows[0]
    for row in report["sampler_ce"].values():
        assert row["e2e_ce"] == pytest.approx(text_metrics.next_token_ce(e2e, w[:, :-1], w[:, 1:]))

    assert set(report["samples"]) == {
        "held-out text", "held-out text, other prompts", "end-to-end T=1.0",
        f"{equal_memory} T=1.0",
        *(f"{dblocks} {s} {n}/block" for s in ("ancestral", "euler") for n in (1, 2)),
        f"{dblocks} block 0 alone, sigma 80",
    }
    for row in report["samples"].values():
        assert set(row) == SAMPLE_KEYS | {"ngram_judge_ce", "ngram_dropped_fraction", "dblocks_judge_ce"}
        assert 0 <= row["mauve"] <= 1 and math.isfinite(row["judge_ce"])
        assert math.isfinite(row["dblocks_judge_ce"])
        # a toy model may draw ids >= 256 only (its vocabulary is 2048 wide): then NaN
        assert math.isfinite(row["ngram_judge_ce"]) or row["ngram_dropped_fraction"] == 1
    for real in ("held-out text", "held-out text, other prompts"):
        assert report["samples"][real]["ngram_dropped_fraction"] == 0
        assert math.isfinite(report["samples"][real]["ngram_judge_ce"])
    # the 5-gram judge scores byte ids only: the byte tokenizer's BOS/EOS never reach it
    assert len(seen["ngram"]) == len(report["samples"])
    assert report["samples"][f"{dblocks} euler 2/block"]["decoding"]["steps_per_block"] == 2
    assert report["samples"]["held-out text"]["decoding"] is None
    assert set(report["teacher_forced"]) == {
        "end-to-end", "judge", dblocks, "judge, DiffusionBlocks", equal_memory}
    assert set(report["teacher_forced"][dblocks]["sigma_ce"]) == {"80", "0.2"}
    assert report["teacher_forced"][dblocks]["sigma_ce"]["80"]["block"] == 0
    assert math.isfinite(report["teacher_forced"]["judge"]["next_token_ce"])
    # the judge is trained twice as long as the end-to-end run, with another seed
    assert (out / "judge" / "checkpoint" / "step-4").is_dir()
    # budgets: each run's intermediate checkpoint at half its steps
    assert set(report["budgets"]) == {"0.5", "1"}
    assert report["budgets"]["0.5"][dblocks]["step"] == 2
    assert report["budgets"]["0.5"]["end-to-end"]["step"] == 1
    assert report["budgets"]["1"]["end-to-end"]["ce"] == pytest.approx(
        text_metrics.next_token_ce(e2e, w[:, :-1], w[:, 1:]))
    assert set(report["end_to_end_ce"]) == {"end-to-end", equal_memory}
    assert report["end_to_end_ce"]["end-to-end"] == pytest.approx(report["budgets"]["1"]["end-to-end"]["ce"])
    assert report["end_to_end_ce"][equal_memory] == pytest.approx(report["budgets"]["1"][equal_memory]["ce"])
    assert (out / "budgets.svg").read_text().startswith("<svg")
    # --no-samples: the same held-out CEs, no sample sets
    tool.main([*argv, "--skip-training", "--no-samples", "--budgets", "1", "--report", str(out / "ce_only.json")])
    ce_only = json.loads((out / "ce_only.json").read_text())
    assert ce_only["samples"] == {} and "budgets" not in ce_only
    assert ce_only["sampler_ce"] == report["sampler_ce"]
    # --skip-training leaves out a row whose final checkpoint is missing, and needs the
    # end-to-end run's and (for samples) the judge's
    (out / "e2e_equal_memory").rename(tmp_path / "moved_away")
    tool.main([*argv, "--skip-training", "--no-samples", "--budgets", "1", "--report", str(out / "left_out.json")])
    left_out = json.loads((out / "left_out.json").read_text())
    assert set(left_out["end_to_end_ce"]) == {"end-to-end"}
    assert left_out["sampler_ce"] == report["sampler_ce"]
    (out / "judge").rename(tmp_path / "judge_away")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        tool.main([*argv, "--skip-training", "--budgets", "1"])
    assert exit_info.value.code == 2 and "the samples need the judge's checkpoint" in capsys.readouterr().err
    (out / "e2e").rename(tmp_path / "e2e_away")
    with pytest.raises(SystemExit) as exit_info:
        tool.main([*argv, "--skip-training", "--no-samples", "--budgets", "1"])
    assert exit_info.value.code == 2 and "end-to-end run" in capsys.readouterr().err
    from PIL import Image
    with Image.open(out / "budgets.png") as plot:
        assert plot.format == "PNG" and plot.size == (900, 440)
        # the lines are drawn: pixels of the first two models' colours
        colours = {colour for _, colour in plot.convert("RGB").getcolors(1 << 20)}
    assert (0x1f, 0x77, 0xb4) in colours and (0xd6, 0x27, 0x28) in colours


def test_ngram_judge_drops_the_byte_tokenizers_special_ids():
    ngram = NgramLM.fit("to be or not to be, that is the question\n" * 5)
    prompts = torch.tensor([[256, *b"to be or "]])
    continuations = torch.tensor([[*b"not to", 257]])
    assert judge_ce_on_bytes(ngram, prompts, continuations) == pytest.approx(
        ngram.score([b"to be or "], [b"not to"]))
    assert math.isnan(judge_ce_on_bytes(ngram, prompts, torch.tensor([[257, 256]])))


def test_sampler_judge_ce_scores_the_continuation_positions_only(monkeypatch):
    """The DiffusionBlocks judge reads each chain's log p(true) at the continuation's
    positions: labels P - 1 onwards of the joined window."""
    from diffusion_blocks.eval import sampler_ce
    model = make_model(num_blocks=2)
    prompts, continuations = torch.arange(6).reshape(2, 3), torch.arange(10, 14).reshape(2, 2)

    def fake_chain_log_probs(model, windows, config, generator, copies, table, split_draws=0):
        # log p(true) = -(the label's token id) at the final state (an earlier state
        # reads 0): the continuation's labels cost 10..13
        final = -windows[:, 1:].double().expand(copies, -1, -1)
        return [(80.0, 0), (0.002, 1)], torch.stack([torch.zeros_like(final), final], dim=1)

    monkeypatch.setattr(sampler_ce, "chain_log_probs", fake_chain_log_probs)
    ce = sampler_ce.sampler_judge_ce(model, prompts, continuations, sampler_ce.DecodingConfig(), 2)
    assert ce == pytest.approx(continuations.double().mean().item())


def test_dblocks_args_reach_only_the_diffusion_blocks_runs_and_train_missing_skips_finished_runs(
    tmp_path, monkeypatch
):
    tool = load_tool()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_sentences(50)) + "\n")
    args, overrides = tool.parse_args([
        "--data", str(corpus), "--out", str(tmp_path), "--train-missing",
        "--dblocks-args=--diffusion_blocks.block0_sigma_sampling log_uniform",
    ])
    runs = tool.planned_runs(args, overrides, tmp_path / "train.txt")
    lever = ["--diffusion_blocks.block0_sigma_sampling", "log_uniform"]
    for name, run in runs.items():
        has_lever = any(run.overrides[i:i + 2] == lever for i in range(len(run.overrides)))
        assert has_lever == name.startswith("DiffusionBlocks"), name
    # a run whose final checkpoint is there is not trained again
    e2e = runs["end-to-end"]
    (tmp_path / e2e.dump / "checkpoint" / f"step-{e2e.steps}").mkdir(parents=True)
    (tmp_path / e2e.dump / "checkpoint" / f"step-{e2e.steps}" / ".metadata").write_text("")
    trained = []
    monkeypatch.setattr(sys.modules["common"], "train", lambda name, *a, **k: trained.append(name))
    monkeypatch.setattr(tool, "load", lambda overrides: (_ for _ in ()).throw(SystemExit("stop")))
    with pytest.raises(SystemExit, match="stop"):
        tool.main(["--data", str(corpus), "--out", str(tmp_path), "--train-missing"])
    assert trained == ["judge", "DiffusionBlocks B=4", "judge, DiffusionBlocks"]


def test_train_missing_resumes_an_unfinished_run_from_its_last_checkpoint(tmp_path, monkeypatch):
    """An interrupted run (its last checkpoint at step 2 of 4) is trained again from
    step 2, not from scratch; the finished ones are skipped."""
    tool = load_tool()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_sentences(100)) + "\n")
    argv = ["--data", str(corpus), "--out", str(tmp_path), "--train-missing", "--steps", "4",
            "--warmup", "1", "--checkpoint-interval", "2", "--num-blocks", "2",
            "--prompt-len", "8", "--new-tokens", "4",
            "--training.seq_len", "16", "--training.local_batch_size", "2",
            "--checkpoint.last_save_model_only"]
    runs = tool.planned_runs(*tool.parse_args(argv), tmp_path / "train.txt")
    e2e = runs["end-to-end"]
    tool.split_corpus(corpus, tmp_path)
    log = tmp_path / f"log_{e2e.dump}.txt"
    common = sys.modules["common"]
    common.train("end-to-end", e2e.overrides, e2e.steps, log)
    checkpoints = tmp_path / e2e.dump / "checkpoint"
    assert (checkpoints / "step-2").is_dir()  # saved every --checkpoint-interval steps
    shutil.rmtree(checkpoints / "step-4")     # interrupted after step 2
    for name, run in runs.items():            # the others finished
        if name != "end-to-end":
            final = tmp_path / run.dump / "checkpoint" / f"step-{run.steps}"
            final.mkdir(parents=True)
            (final / ".metadata").write_text("")
    real_train, trained = common.train, []

    def train(name, *a, **k):
        trained.append(name)
        return real_train(name, *a, **k)

    monkeypatch.setattr(common, "train", train)
    monkeypatch.setattr(tool, "load", lambda overrides: (_ for _ in ()).throw(SystemExit("stop")))
    with pytest.raises(SystemExit, match="stop"):
        tool.main(argv)
    assert trained == ["end-to-end"]
    assert (checkpoints / "step-4" / ".metadata").is_file()
    second_part = log.read_text().split("Loading the checkpoint from")
    assert len(second_part) == 2 and second_part[1].split(".\n")[0].strip().endswith("step-2")


def test_the_budget_runs_plan_every_row_of_issue_21_item_4(tmp_path):
    """docs/results/lm.md's budget command: the runs, their steps, the equal-memory
    flavor (the last word on --model.flavor), checkpoints at the interval and at every
    budget step, all kept."""
    tool = load_tool()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_sentences(50)) + "\n")
    args, overrides = tool.parse_args([
        "--data", str(corpus), "--out", str(tmp_path),
        "--job.config_file", str(REPO / "train_configs" / "llama3_shakespeare.toml"),
        "--steps", "600", "--warmup", "60", "--num-blocks", "4", "--checkpoint-interval", "50",
        "--equal-memory-row", "--equal-compute-row", "--init-from-e2e", "--budgets", "0.25,0.5,1",
    ])
    runs = tool.planned_runs(args, overrides, tmp_path / "train.txt")
    (tmp_path / "e2e" / "checkpoint" / "step-600").mkdir(parents=True)  # --init-from-e2e's
    steps = {name: run.steps for name, run in runs.items()}
    assert steps == {
        "end-to-end": 600, "judge": 1200, "DiffusionBlocks B=4": 2400,
        "judge, DiffusionBlocks": 4800, "end-to-end, small_2l (equal memory)": 600,
        "end-to-end, 1200 steps (equal compute, the judge's run)": 1200,
        "DiffusionBlocks B=4, from the end-to-end weights": 2400,
    }
    for name, run in runs.items():
        job_config = tool.parse_job_config(run.overrides)
        assert job_config.training.seq_len == 128 and job_config.checkpoint.keep_latest_k == 0
        interval = job_config.checkpoint.interval
        assert interval <= 50 and all(s % interval == 0 for s in tool.budget_steps(run.steps, args.budgets))
        layers = 2 if "equal memory" in name else 8
        assert job_config.model.flavor == f"small_{layers}l", name
        assert job_config.diffusion_blocks.enable == name.startswith(("DiffusionBlocks", "judge, D")), name
        model_args = copy.deepcopy(dblocks_llama3_flavors()[job_config.model.flavor])
        model_args.update_from_config(job_config)  # the partition fits the layers
        assert model_args.n_layers == layers
    # the equal-compute row is the judge's run, trained once
    assert runs["end-to-end, 1200 steps (equal compute, the judge's run)"] is runs["judge"]


def test_parallel_runs_train_each_run_once_and_the_run_from_e2e_waits_for_it(tmp_path, monkeypatch):
    """--parallel-runs 2: every planned run is trained once (the equal-compute row is
    the judge's run), at most two at a time, and the DiffusionBlocks run that starts
    from the end-to-end weights starts only after the end-to-end run has finished."""
    import threading
    import time

    tool = load_tool()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_sentences(50)) + "\n")
    argv = ["--data", str(corpus), "--out", str(tmp_path), "--parallel-runs", "2",
            "--init-from-e2e", "--equal-compute-row", "--no-dblocks-judge"]
    events, running, lock = [], [], threading.Lock()

    def fake_train(name, overrides, steps, log, position=0):
        with lock:
            events.append(("start", name))
            running.append(name)
            assert len(running) <= 2
        time.sleep(0.2 if name == "end-to-end" else 0.05)
        with lock:
            running.remove(name)
            events.append(("end", name))

    monkeypatch.setattr(sys.modules["common"], "train", fake_train)
    monkeypatch.setattr(tool, "load", lambda overrides: (_ for _ in ()).throw(SystemExit("stop")))
    with pytest.raises(SystemExit, match="stop"):
        tool.main(argv)
    started = [name for kind, name in events if kind == "start"]
    assert sorted(started) == sorted(["end-to-end", "judge", "DiffusionBlocks B=4",
                                      "DiffusionBlocks B=4, from the end-to-end weights"])
    assert events.index(("end", "end-to-end")) < events.index(
        ("start", "DiffusionBlocks B=4, from the end-to-end weights"))


def test_row_trains_only_the_named_runs_and_measures_them_beside_end_to_end(
        tmp_path, monkeypatch, capsys):
    """--row NAME (repeatable): only those runs are trained; the end-to-end run is
    measured beside them (here it was never trained: one error line saying so); a name
    that is no row, or samples without the judge's run, is one error line too."""
    tool = load_tool()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_sentences(50)) + "\n")
    base = ["--data", str(corpus), "--out", str(tmp_path), "--equal-memory-row", "--no-dblocks-judge"]
    trained = []
    monkeypatch.setattr(sys.modules["common"], "train",
                        lambda name, overrides, steps, log, position=0: trained.append(name))
    capsys.readouterr()
    for argv, message in [
        (["--no-samples", "--row", "end-to-end, debugmodel_2l (equal memory)", "--row", "DiffusionBlocks B=4"],
         "error: --row: every row is compared with the end-to-end run, which has no "
         f"checkpoint in {tmp_path / 'e2e'}; train it first"),
        (["--no-samples", "--row", "DiffusionBlocks B=3"],
         "error: --row 'DiffusionBlocks B=3': no such row with these options; the rows are "
         "'end-to-end', 'judge', 'DiffusionBlocks B=4', 'end-to-end, debugmodel_2l (equal memory)'"),
        (["--row", "DiffusionBlocks B=4"],
         "error: --row: the samples need the judge's run; add --row judge or --no-samples"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            tool.main([*base, *argv])
        assert exit_info.value.code != 0
        assert capsys.readouterr().err.strip().splitlines() == [message]
    assert sorted(trained) == sorted(["DiffusionBlocks B=4", "end-to-end, debugmodel_2l (equal memory)"])


def test_a_lever_is_one_more_dblocks_row_with_its_flags(tmp_path):
    tool = load_tool()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_sentences(50)) + "\n")
    lever = "balanced=--diffusion_blocks.partition explicit --diffusion_blocks.sigma_boundaries 0.1 1 10"
    args, overrides = tool.parse_args(["--data", str(corpus), "--out", str(tmp_path), "--lever", lever])
    runs = tool.planned_runs(args, overrides, tmp_path / "train.txt")
    main, balanced = runs["DiffusionBlocks B=4"], runs["DiffusionBlocks B=4, balanced"]
    assert balanced.steps == main.steps and balanced.dump == "dblocks_balanced"
    job_config = tool.parse_job_config(balanced.overrides)
    assert job_config.diffusion_blocks.partition == "explicit"
    assert job_config.diffusion_blocks.sigma_boundaries == [0.1, 1.0, 10.0]
    assert tool.parse_job_config(main.overrides).diffusion_blocks.partition == "equiprobable"
    with pytest.raises(SystemExit):
        tool.parse_args(["--data", str(corpus), "--lever", "Bad Name=--x 1"])


def test_chains_that_do_not_fill_whole_split_groups_are_refused_in_one_line(tmp_path, capsys):
    tool = load_tool()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_sentences(50)) + "\n")
    with pytest.raises(SystemExit):
        tool.parse_args(["--data", str(corpus), "--chains", "24", "--split-draws", "4"])
    assert "--chains 24: the ancestral sampler's CE runs chains in groups of 2^--split-draws = 16" in capsys.readouterr().err
    args, _ = tool.parse_args(["--data", str(corpus), "--chains", "24", "--split-draws", "3"])
    assert tool.split_draws(args, "ancestral") == 3 and tool.split_draws(args, "euler") == 0


def test_checkpoint_interval_is_not_cut_down_by_the_last_step():
    """torchtitan saves the last step whatever the interval: only the budget steps before
    it set the gcd (a 4157-step run saved every step and filled the disk)."""
    sys.path.insert(0, str(REPO / "tools" / "reports"))
    from budget import checkpoint_interval

    assert checkpoint_interval(4157, 50, [1.0]) == 50
    assert checkpoint_interval(600, 50, [0.25, 0.5, 1.0]) == 50
    assert checkpoint_interval(600, 40, [0.25, 1.0]) == 10  # step 150
    assert checkpoint_interval(300, None, [1.0]) == 300
