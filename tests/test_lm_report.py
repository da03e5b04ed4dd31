"""tools/reports/lm.py and the measures it reports (diffusion_blocks.eval.text and
diffusion_blocks.models.llama3.evaluation)."""

import importlib.util
import json
import math
import sys

import pytest
import torch

import diffusion_blocks  # noqa: F401
from diffusion_blocks.data.text import synthetic_sentences
from diffusion_blocks.eval import text as text_metrics
from diffusion_blocks.models.llama3 import evaluation
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

    def denoise(tokens_BT, z_BTD, sigma_B, block):
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

    def denoise(tokens_BT, z_BTD, sigma_B, block):
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


def test_lm_report_writes_the_documented_keys(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(synthetic_sentences(300)) + "\n")
    out = tmp_path / "report"
    load_tool().main([
        "--data", str(corpus), "--out", str(out), "--steps", "2", "--warmup", "1",
        "--num-blocks", "2", "--samplers", "ancestral,euler", "--steps-per-block", "1,2",
        "--temperatures", "1.0", "--sigmas", "80,0.2", "--prompts", "4", "--prompt-len", "8",
        "--new-tokens", "4", "--eval-windows", "2",
        "--training.seq_len", "16", "--training.local_batch_size", "2",
        "--checkpoint.last_save_model_only",
    ])
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"args", "samples", "teacher_forced"}
    dblocks = "DiffusionBlocks B=2"
    assert set(report["samples"]) == {
        "held-out text", "held-out text, other prompts", "end-to-end T=1.0",
        *(f"{dblocks} {s} {n}/block" for s in ("ancestral", "euler") for n in (1, 2)),
        f"{dblocks} block 0 alone, sigma 80",
    }
    for row in report["samples"].values():
        assert set(row) == SAMPLE_KEYS
        assert 0 <= row["mauve"] <= 1 and math.isfinite(row["judge_ce"])
    assert report["samples"][f"{dblocks} euler 2/block"]["decoding"]["steps_per_block"] == 2
    assert report["samples"]["held-out text"]["decoding"] is None
    assert set(report["teacher_forced"]) == {"end-to-end", "judge", dblocks}
    assert set(report["teacher_forced"][dblocks]["sigma_ce"]) == {"80", "0.2"}
    assert report["teacher_forced"][dblocks]["sigma_ce"]["80"]["block"] == 0
    assert math.isfinite(report["teacher_forced"]["judge"]["next_token_ce"])
    # the judge is trained twice as long as the end-to-end run, with another seed
    assert (out / "judge" / "checkpoint" / "step-4").is_dir()


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
    monkeypatch.setattr(tool, "train", lambda name, *a: trained.append(name))
    monkeypatch.setattr(tool, "load", lambda overrides: (_ for _ in ()).throw(SystemExit("stop")))
    with pytest.raises(SystemExit, match="stop"):
        tool.main(["--data", str(corpus), "--out", str(tmp_path), "--train-missing"])
    assert trained == ["judge", "DiffusionBlocks B=4"]
