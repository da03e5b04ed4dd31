"""tools/balance_partition.py and evaluation.denoising_ce_profile: the information-balanced
partition of issue 21's lever (a)."""

import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import REPO
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.config.sections import DiffusionBlocks
from diffusion_blocks.data.text import synthetic_sentences
from diffusion_blocks.diffusion.partition import BlockPartition
from diffusion_blocks.inference import build_for_inference
from diffusion_blocks.models.llama3.evaluation import denoising_ce_profile

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
    assert len(result["sigmas"]) == len(result["ce"]) == 9
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
