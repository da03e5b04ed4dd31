"""tools/balance_partition.py and evaluation.denoising_ce_profile: the information-balanced
partition of issue 21's lever (a); for MD4 the equal-ELBO-share partition (issue 22's
lever): masking.elbo_share_boundaries, md4.evaluation.elbo_integrand_profile and the
explicit t partition it trains with."""

import importlib.util
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import REPO
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.config.sections import DiffusionBlocks
from diffusion_blocks.data.text import synthetic_sentences
from diffusion_blocks.diffusion.masking import MaskingSchedule, elbo_share_boundaries
from diffusion_blocks.diffusion.partition import BlockPartition
from diffusion_blocks.errors import ConfigError
from diffusion_blocks.inference import build_for_inference
from diffusion_blocks.models.llama3.evaluation import denoising_ce_profile
from diffusion_blocks.models.md4.evaluation import elbo_integrand_profile, stratum_edges

TINY = ["--job.config_file", str(REPO / "train_configs" / "llama3_debug.toml"),
        "--model.flavor", "small_8l", "--training.seq_len", "16"]


def load_tool():
    spec = importlib.util.spec_from_file_location("balance_partition", REPO / "tools" / "balance_partition.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_the_profile_noises_the_labels_at_each_sigma_for_the_owning_block():
    """A stand-in model whose logits put all mass on the label when sigma < 1 and are
    uniform over 4 tokens otherwise: the profile is 0 below 1 and ln 4 above, each call
    by the block owning its sigma with the training corruption's arguments."""
    partition = BlockPartition.from_config(DiffusionBlocks(num_blocks=2), n_layers=2)
    calls = []

    def model(tokens_BT, labels_BT, *, block, noise_BTD, sigma_B):
        calls.append((block, float(sigma_B[0]), tuple(noise_BTD.shape)))
        if sigma_B[0] < 1:
            return 50.0 * torch.nn.functional.one_hot(labels_BT, 4).float()
        return torch.zeros(*labels_BT.shape, 4)

    class StandIn:
        tok_embeddings = SimpleNamespace(weight=torch.zeros(4, 3))

        def __call__(self, *a, **k):
            return model(*a, **k)

    stand_in = StandIn()
    stand_in.partition = partition
    tokens, labels = torch.zeros(2, 5, dtype=torch.long), torch.randint(0, 4, (2, 5))
    sigmas = [0.01, 0.5, 5.0, 80.0]
    ce = denoising_ce_profile(stand_in, tokens, labels, sigmas, torch.Generator().manual_seed(0))
    assert ce[:2] == pytest.approx([0.0, 0.0], abs=1e-6) and ce[2:] == pytest.approx([math.log(4)] * 2)
    owners = [int(partition.block_of_level(torch.tensor([s]))[0]) for s in sigmas]
    assert [c[0] for c in calls] == owners and [c[1] for c in calls] == pytest.approx(sigmas)
    assert all(c[2] == (2, 5, 3) for c in calls)


@pytest.fixture
def checkpoint(tmp_path):
    job_config = parse_job_config(TINY)
    model, _, _ = build_for_inference(job_config, torch.device("cpu"))
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "step-1"))
    text = tmp_path / "train.txt"
    text.write_text("\n".join(synthetic_sentences(40)) + "\n")
    return tmp_path / "step-1", text


def test_the_tool_prints_a_cut_that_trains(checkpoint, monkeypatch, capsys):
    """Its JSON holds the measured profile and the cut; the printed flags give a config
    whose partition is that cut."""
    step, text = checkpoint
    tool = load_tool()
    monkeypatch.setattr(tool, "denoising_ce_profile",  # linear in ln(sigma): 4 at the top, 0 at the bottom
                        lambda model, x, y, sigmas, g: [4 * i / (len(sigmas) - 1) for i in range(len(sigmas))])
    tool.main([*TINY, "--checkpoint", str(step), "--data", str(text), "--points", "9", "--windows", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    lo, hi = 0.002, 80.0
    expected = [math.exp(math.log(lo) + f * (math.log(hi) - math.log(lo))) for f in (0.25, 0.5, 0.75)]
    assert result["sigma_boundaries"] == pytest.approx(expected, rel=1e-6)
    assert len(result["levels"]) == len(result["profile"]) == 9 and result["level_name"] == "sigma"
    tool.main([*TINY, "--checkpoint", str(step), "--data", str(text), "--points", "9", "--windows", "2"])
    flags = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("train with: ").split()
    job_config = parse_job_config([*TINY, *flags[:2], flags[2], *flags[3:]])
    partition = BlockPartition.from_job_config(job_config, n_layers=8)
    assert list(partition.boundaries[1:-1]) == pytest.approx(expected, rel=1e-3)


def test_the_tool_refuses_an_end_to_end_config_in_one_line(checkpoint, capsys):
    step, text = checkpoint
    with pytest.raises(SystemExit) as stopped:
        load_tool().main([*TINY, "--diffusion_blocks.no_enable", "--checkpoint", str(step), "--data", str(text)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: balance_partition.py measures a block-wise model; the config has "
        "[diffusion_blocks] enable = false")


# ---------------------------------------------------------------------------
# MD4: an equal share of the ELBO per block

MD4_TINY = ["--job.config_file", str(REPO / "train_configs" / "md4_chars.toml"),
            "--training.seq_len", "16"]


def test_elbo_share_cuts_equal_areas_under_the_integrand():
    """A flat integrand: equal t intervals; a linear one v(t) = t (area t^2 / 2): the
    cut at sqrt(b / B); the end points extend flat to t = 0 and 1."""
    assert elbo_share_boundaries([0.1, 0.5, 0.9], [2.0, 2.0, 2.0], 4) == pytest.approx([0.25, 0.5, 0.75])
    times = [1e-9, 0.25, 0.5, 0.75, 1 - 1e-9]
    assert elbo_share_boundaries(times, times, 4) == pytest.approx([0.5, math.sqrt(0.5), math.sqrt(0.75)], abs=1e-6)
    # the end points extend flat: a step from 1 to 3 at the middle, points at 0.25 and 0.75
    cut = elbo_share_boundaries([0.25, 0.75], [1.0, 3.0], 2)
    area = lambda x: x if x <= 0.25 else 0.25 + (x - 0.25) * (1 + (1 + 4 * (x - 0.25))) / 2  # noqa: E731
    total = 0.25 * 1 + 0.5 * 2 + 0.25 * 3
    assert 0.25 < cut[0] < 0.75 and area(cut[0]) == pytest.approx(total / 2)


@pytest.mark.parametrize("times, nats, what", [
    ([0.5], [1.0], "at least two"), ([0.0, 0.5], [1.0, 1.0], "inside (0, 1)"),
    ([0.2, 0.5], [1.0, float("nan")], ">= 0"), ([0.2, 0.5], [0.0, 0.0], "zero everywhere"),
])
def test_elbo_share_refuses_what_it_cannot_cut(times, nats, what):
    with pytest.raises(ValueError, match=re.escape(what)):
        elbo_share_boundaries(times, nats, 2)


def test_an_explicit_t_partition_trains_samples_and_evaluates_inside_its_blocks():
    """partition = 'explicit' on the masking process: the boundaries are times; every
    block takes num_steps / B sampler steps and S / B held-out strata inside its own
    interval; the paper's partition keeps its equal-alpha grids; a time outside (0, 1)
    is refused naming t."""
    flags = ["--diffusion_blocks.num_blocks", "4", "--diffusion_blocks.partition", "explicit",
             "--diffusion_blocks.sigma_boundaries", "0.2", "0.45", "0.8"]
    job_config = parse_job_config([*MD4_TINY, *flags])
    schedule = MaskingSchedule()
    partition = BlockPartition.from_job_config(job_config, n_layers=8, schedule=schedule)
    assert list(partition.boundaries) == [0.0, 0.2, 0.45, 0.8, 1.0]
    plan = schedule.sampling_plan(8, list(partition.boundaries))
    for block in range(4):
        steps = [step for step in plan if step.block == block]
        lo, hi = partition.interval(block)
        assert len(steps) == 2 and all(lo - 1e-12 <= s.s < s.t <= hi + 1e-12 for s in steps)
    edges = stratum_edges(partition, 8)
    assert len(edges) == 9 and set(partition.boundaries) <= set(edges)
    paper = BlockPartition.from_config(DiffusionBlocks(num_blocks=4), n_layers=8, schedule=schedule)
    assert stratum_edges(paper, 8) == pytest.approx(schedule.equal_alpha_times(8), abs=1e-12)
    grid = schedule.equal_alpha_times(8)[::-1]
    paper_plan = schedule.sampling_plan(8, list(paper.boundaries))
    assert [s.t for s in paper_plan] == pytest.approx(grid[:-1], abs=1e-12)
    assert [s.s for s in paper_plan] == pytest.approx(grid[1:], abs=1e-12)
    with pytest.raises(ConfigError, match=re.escape("(0, 1), the model's noise level being t")):
        BlockPartition.from_job_config(parse_job_config([*MD4_TINY, *flags[:-1], "1.5"]),
                                       n_layers=8, schedule=schedule)


def test_the_elbo_profile_scores_each_time_with_its_owning_block():
    """A stand-in MD4 whose logits are uniform over V = 5: every masked token costs
    ln 5, so the integrand w(t) (1 - alpha_t) ln 5 is about ln 5 at every t; each t
    is scored by the block that owns it."""
    partition = BlockPartition.from_config(DiffusionBlocks(num_blocks=2), n_layers=2, schedule=MaskingSchedule())
    calls = []

    class StandIn:
        mask_token_id = 5

        def __call__(self, z_BT, t_B, *, block):
            calls.append((block, float(t_B[0])))
            return torch.zeros(*z_BT.shape, 5)

    stand_in = StandIn()
    stand_in.partition = partition
    tokens = torch.randint(0, 5, (64, 32))
    times = [0.1, 0.4, 0.6, 0.9]
    profile = elbo_integrand_profile(stand_in, tokens, times)
    assert profile == pytest.approx([math.log(5)] * 4, rel=0.1)
    assert [c[0] for c in calls] == [1, 1, 0, 0] and [c[1] for c in calls] == pytest.approx(times)


def test_the_tool_prints_an_elbo_share_cut_for_md4_that_trains(tmp_path, monkeypatch, capsys):
    job_config = parse_job_config(MD4_TINY)
    model, _, _ = build_for_inference(job_config, torch.device("cpu"))
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "step-1"))
    text = tmp_path / "train.txt"
    text.write_text("\n".join(synthetic_sentences(40)) + "\n")
    tool = load_tool()
    monkeypatch.setattr(tool, "elbo_integrand_profile", lambda model, windows, times, seed: [1.0] * len(times))
    tool.main([*MD4_TINY, "--checkpoint", str(tmp_path / "step-1"), "--data", str(text),
               "--points", "8", "--windows", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["level_name"] == "t" and result["levels"] == pytest.approx([(i + 0.5) / 8 for i in range(8)])
    assert result["sigma_boundaries"] == pytest.approx([0.25, 0.5, 0.75])
    tool.main([*MD4_TINY, "--checkpoint", str(tmp_path / "step-1"), "--data", str(text),
               "--points", "8", "--windows", "2", "--num-blocks", "2"])
    flags = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("train with: ").split()
    assert flags == ["--diffusion_blocks.partition", "explicit", "--diffusion_blocks.sigma_boundaries", "0.5"]
    # the flags train: the MD4 family reads them (the registry refuses a key it does not)
    cut, _, _ = build_for_inference(
        parse_job_config([*MD4_TINY, "--diffusion_blocks.num_blocks", "2", *flags]), torch.device("cpu"))
    assert list(cut.partition.boundaries) == [0.0, 0.5, 1.0]
