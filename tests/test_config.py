import subprocess
import sys

import pytest

from conftest import REPO
from diffusion_blocks.config_loader import ConfigError, load_composed_toml, parse_job_config


def parse(path, *overrides):
    return parse_job_config(["--job.config_file", str(path), *overrides])


def test_extends_chain_merges_key_by_key_and_cli_wins(write_toml):
    write_toml("base.toml", '[training]\nsteps = 10\nseq_len = 64\n[diffusion_blocks]\nnum_blocks = 2\n')
    write_toml("mid.toml", 'extends = "base.toml"\n[training]\nsteps = 20\n')
    write_toml("other.toml", '[diffusion_blocks]\noverlap = 0.2\n')
    child = write_toml("sub/child.toml", 'extends = ["../mid.toml", "../other.toml"]\n[diffusion_blocks]\nnum_blocks = 4\n')
    cfg = parse(child, "--training.seq_len", "32")
    assert cfg.training.steps == 20            # mid overrides base
    assert cfg.training.seq_len == 32          # CLI overrides everything
    assert cfg.diffusion_blocks.num_blocks == 4  # child overrides base
    assert cfg.diffusion_blocks.overlap == 0.2   # second parent merged
    _, origins = load_composed_toml(child)
    assert origins[("training", "steps")].endswith("mid.toml")
    assert origins[("diffusion_blocks", "num_blocks")].endswith("child.toml")


def test_defaults_without_diffusion_section(write_toml):
    cfg = parse(write_toml("plain.toml", "[training]\nsteps = 3\n"))
    assert cfg.diffusion_blocks.num_blocks == 4 and cfg.diffusion_blocks.partition == "equiprobable"


@pytest.mark.parametrize(
    "text,expected",
    [
        ('[diffusion_blocks]\noverlapp = 0.1\n', ["unknown key", "diffusion_blocks.overlapp", "did you mean overlap"]),
        ('[trainig]\nsteps = 1\n', ["unknown section", "trainig", "did you mean training"]),
        ('[training]\nsteps = "ten"\n', ["training.steps", "expected int"]),
        ('[diffusion_blocks]\nnum_blocks = 2.5\n', ["diffusion_blocks.num_blocks", "expected int"]),
        ('[diffusion_blocks]\noverlap = 0.7\n', ["overlap", "[0, 0.5]"]),
        ('[diffusion_blocks]\nsigma_min = 90.0\n', ["sigma_min", "sigma_max"]),
        ('[diffusion_blocks]\npartition = "cosine"\n', ["partition", "equiprobable"]),
        ('[diffusion_blocks]\nblock_schedule = "shuffle"\n', ["block_schedule", "round_robin"]),
        ('extends = "missing.toml"\n', ["missing.toml", "does not exist"]),
        ('[data]\ntokenizer = "sentencepiece"\n', ["tokenizer", "byte"]),
    ],
)
def test_bad_input_names_file_and_key(write_toml, text, expected):
    path = write_toml("bad.toml", text)
    with pytest.raises(ConfigError) as info:
        parse(path)
    message = str(info.value)
    assert str(path.parent) in message
    for fragment in expected:
        assert fragment in message
    assert "\n" not in message.strip()


def test_error_in_parent_names_the_parent(write_toml):
    parent = write_toml("parent.toml", "[diffusion_blocks]\nnum_blockz = 3\n")
    child = write_toml("child.toml", 'extends = "parent.toml"\n')
    with pytest.raises(ConfigError, match=str(parent)):
        parse(child)


def test_cyclic_extends_is_reported(write_toml):
    write_toml("a.toml", 'extends = "b.toml"\n')
    write_toml("b.toml", 'extends = "c.toml"\n')
    c = write_toml("c.toml", 'extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="cyclic .extends. chain.*c.toml -> .*a.toml -> .*b.toml -> .*c.toml"):
        parse(c)


def test_cli_override_error_names_the_flag(write_toml):
    path = write_toml("ok.toml", "[diffusion_blocks]\noverlap = 0.1\n")
    with pytest.raises(ConfigError, match=r"command line \(--diffusion_blocks.overlap\)"):
        parse(path, "--diffusion_blocks.overlap", "0.9")


def test_num_blocks_that_does_not_fit_layers_names_file(write_toml):
    from diffusion_blocks.partition import BlockPartition

    path = write_toml("fit.toml", "[diffusion_blocks]\nnum_blocks = 3\n")
    cfg = parse(path)
    with pytest.raises(ConfigError, match=rf"{path}.*num_blocks = 3 does not split.*8 layers.*\[1, 2, 4, 8\]"):
        BlockPartition.from_job_config(cfg, 8)
    cfg = parse(write_toml("fit2.toml", "[diffusion_blocks]\nnum_blocks = 3\nlayers_per_block = [2, 3, 3]\n"))
    assert [len(r) for r in BlockPartition.from_job_config(cfg, 8).layer_ranges] == [2, 3, 3]


def run_tool(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "partition.py"), *args],
        capture_output=True, text=True, cwd=REPO,
    )


@pytest.mark.parametrize(
    "text,fragments",
    [
        ('[diffusion_blocks]\noverlapp = 0.1\n', ["overlapp", "did you mean overlap"]),
        ('[training]\nsteps = "ten"\n', ["training.steps", "expected int"]),
        ('extends = "self.toml"\n', ["cyclic"]),
    ],
)
def test_broken_toml_exits_nonzero_with_one_paragraph(write_toml, text, fragments):
    path = write_toml("self.toml", text)
    result = run_tool("--job.config_file", str(path))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(error_lines) == 1 and str(path) in error_lines[0]
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_partition_tool_shows_reference_boundaries():
    result = run_tool("--num-blocks", "3")
    assert result.returncode == 0, result.stderr
    for value in ("0.1796", "0.505", "80", "0.002"):
        assert value in result.stdout


def test_partition_tool_json_for_config_file():
    import json

    result = run_tool("--job.config_file", "train_configs/llama3_debug.toml", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["block"] for r in rows] == [0, 1, 2, 3]
    assert [r["layers"] for r in rows] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert set(rows[0]) == {"block", "layers", "sigma_lo", "sigma_hi", "train_lo", "train_hi", "mass"}
    assert rows[0]["sigma_hi"] == 80.0 and rows[-1]["sigma_lo"] == 0.002
    assert rows[1]["train_lo"] < rows[1]["sigma_lo"] and rows[1]["train_hi"] > rows[1]["sigma_hi"]
    assert sum(r["mass"] for r in rows) > 1.0  # overlap 0.1 widens every interval
