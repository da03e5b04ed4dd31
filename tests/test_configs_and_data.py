import copy
import json

import pytest
import torch

import diffusion_blocks  # noqa: F401
from conftest import REPO, SHARED_DATA
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.data.text import ByteTokenizer, synthetic_sentences
from diffusion_blocks.models.llama3.model import DiffusionBlocksLlama
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset
from torchtitan.models.llama3 import Transformer
from torchtitan.protocols.train_spec import get_train_spec

CONFIGS = REPO / "train_configs"


def parse(name, *overrides):
    return parse_job_config(["--job.config_file", str(CONFIGS / name), *overrides])


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_every_shipped_config_parses(name):
    parse(name)


def test_llama3_8b_builds_on_meta_with_four_blocks():
    job_config = parse("llama3_8b.toml")
    assert job_config.model.flavor == "8B_flex" and job_config.training.seq_len == 8192
    assert job_config.activation_checkpoint.mode == "selective"  # inherited from the torchtitan preset
    spec = get_train_spec(job_config.model.name)
    args = copy.deepcopy(spec.model_args[job_config.model.flavor])
    args.update_from_config(job_config)
    with torch.device("meta"):
        denoiser = DiffusionBlocksLlama(args)
        baseline = Transformer(args)
    assert [len(r) for r in denoiser.partition.layer_ranges] == [8, 8, 8, 8]
    n_denoiser = sum(p.numel() for p in denoiser.parameters())
    n_baseline = sum(p.numel() for p in baseline.parameters())
    assert 7.9e9 < n_baseline < 8.1e9
    # AdaLN-Zero adds 6 * dim * adaln_cond_dim (256) per layer: about 2.5% at 8B
    assert n_baseline < n_denoiser < 1.03 * n_baseline


def first_batches(dataset, n):
    out = []
    for sample in dataset:
        out.append(sample)
        if len(out) == n:
            return out


def test_synthetic_text_dataset_needs_no_files():
    job_config = parse("llama3_debug.toml", "--training.seq_len", "32")
    ds = HuggingFaceTextDataset("synthetic_text", None, ByteTokenizer(), seq_len=32)
    (inputs, labels), = first_batches(ds, 1)
    assert inputs["input"].shape == (32,) and torch.equal(inputs["input"][1:], labels[:-1])
    assert int(labels.max()) < 258
    assert len(set(synthetic_sentences(100))) > 50
    assert job_config.training.dataset == "synthetic_text"


def test_text_file_dataset_reads_jsonl_and_txt(tmp_path):
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"line {i} of the corpus"}) for i in range(50)))
    txt = tmp_path / "corpus.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond paragraph\n" * 20)
    tok = ByteTokenizer()
    for path, fragment in ((jsonl, "line 0 of the corpus"), (txt, "first paragraph")):
        ds = HuggingFaceTextDataset("text_file", str(path), tok, seq_len=64)
        (inputs, _), = first_batches(ds, 1)
        assert fragment in tok.decode(inputs["input"].tolist())


def test_text_file_without_path_is_a_clear_error():
    with pytest.raises(ValueError, match="dataset_path"):
        HuggingFaceTextDataset("text_file", None, ByteTokenizer(), seq_len=8)


@pytest.mark.skipif(not (SHARED_DATA / "tinyshakespeare.txt").exists(), reason="needs ../shared/data")
def test_text_config_reads_tinyshakespeare():
    job_config = parse("llama3_text.toml", "--training.dataset_path", str(SHARED_DATA / "tinyshakespeare.txt"))
    ds = HuggingFaceTextDataset(
        job_config.training.dataset, job_config.training.dataset_path, ByteTokenizer(), seq_len=64
    )
    (inputs, _), = first_batches(ds, 1)
    assert "First Citizen" in ByteTokenizer().decode(inputs["input"].tolist())


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo", add_bos=True, add_eos=True)
    assert ids[0] == 256 and ids[-1] == 257 and tok.decode(ids) == "héllo"
