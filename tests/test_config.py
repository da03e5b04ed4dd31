import subprocess
import sys
import uuid

import pytest
from torchtitan.config import ConfigManager

from conftest import REPO
from diffusion_blocks.config.loader import load_composed_toml, parse_job_config
from diffusion_blocks.errors import ConfigError


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
    from diffusion_blocks.diffusion.partition import BlockPartition

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


# ---------------------------------------------------------------------------
# torchtitan's extension points: [job] custom_config_module, [experimental] custom_import

DEBUG_TOML = REPO / "train_configs" / "llama3_debug.toml"

MY_CONFIG_MODULE = """
from dataclasses import dataclass, field


@dataclass
class MySection:
    alpha: int = 1


@dataclass
class JobConfig:
    my_section: MySection = field(default_factory=MySection)
"""

TINY_DATASET_MODULE = """
from datasets import Dataset
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

LINES = [f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(64)]

DATASETS[DATASET_NAME] = DatasetConfig(
    path="in-memory",
    loader=lambda path: Dataset.from_dict({"text": LINES}),
    sample_processor=lambda sample: sample["text"],
)
"""


def tiny_dataset_module(dataset: str) -> str:
    return TINY_DATASET_MODULE.replace("DATASET_NAME", repr(dataset))


def write_module(folder, text: str, prefix: str) -> str:
    """Write text as a fresh module in folder; its unique name (no import-cache leaks)."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(text)
    return name


@pytest.fixture
def my_config_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return write_module(tmp_path, MY_CONFIG_MODULE, "my_config")


def test_custom_config_module_in_toml_is_merged_and_checked(write_toml, my_config_module):
    path = write_toml(
        "custom.toml",
        f'extends = "{DEBUG_TOML}"\n[job]\ncustom_config_module = "{my_config_module}"\n'
        "[my_section]\nalpha = 5\n",
    )
    cfg = parse(path)
    assert cfg.my_section.alpha == 5
    assert cfg.diffusion_blocks.num_blocks == 4  # ours still merged


def test_diffusion_blocks_config_is_a_custom_config_module(write_toml):
    """`diffusion_blocks.config` (a package) exposes the JobConfig torchtitan merges: its
    own ConfigManager takes it, and so does our loader, named in a TOML."""
    titan = ConfigManager().parse_args([
        "--job.custom_config_module", "diffusion_blocks.config", "--diffusion_blocks.num_blocks", "2",
    ])
    assert titan.diffusion_blocks.num_blocks == 2 and titan.recurrent.mean_recurrence >= 1
    path = write_toml(
        "ours.toml",
        f'extends = "{DEBUG_TOML}"\n[job]\ncustom_config_module = "diffusion_blocks.config"\n'
        "[diffusion_blocks]\nnum_blocks = 2\n",
    )
    cfg = parse(path)
    assert cfg.job.custom_config_module == "diffusion_blocks.config"
    assert cfg.diffusion_blocks.num_blocks == 2


@pytest.mark.parametrize("flag", ["--job.custom_config_module", "--job.custom-config-module", "="])
def test_custom_config_module_on_command_line(write_toml, my_config_module, flag):
    path = write_toml("custom.toml", f'extends = "{DEBUG_TOML}"\n[my_section]\nalpha = 5\n')
    args = (
        [f"--job.custom_config_module={my_config_module}"]
        if flag == "="
        else [flag, my_config_module]
    )
    assert parse(path, *args).my_section.alpha == 5
    assert parse(path, *args, "--my_section.alpha", "7").my_section.alpha == 7


def test_custom_config_module_unknown_key_names_file_and_closest(write_toml, my_config_module):
    path = write_toml(
        "typo.toml",
        f'extends = "{DEBUG_TOML}"\n[job]\ncustom_config_module = "{my_config_module}"\n'
        "[my_section]\nalpah = 5\n",
    )
    with pytest.raises(ConfigError) as info:
        parse(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "my_section.alpah" in message and "did you mean alpha" in message
    assert "\n" not in message


@pytest.mark.parametrize("where", ["toml", "cli"])
def test_custom_config_module_missing_is_a_config_error(write_toml, where):
    missing = f"no_such_module_{uuid.uuid4().hex[:8]}"
    if where == "toml":
        path = write_toml("missing.toml", f'[job]\ncustom_config_module = "{missing}"\n')
        args, origin = [], str(path)
    else:
        path = write_toml("missing.toml", "[training]\nsteps = 3\n")
        args, origin = ["--job.custom-config-module", missing], "--job.custom-config-module"
    with pytest.raises(ConfigError) as info:
        parse(path, *args)
    message = str(info.value)
    assert origin in message and "custom_config_module" in message and missing in message
    assert "\n" not in message


def test_custom_config_module_without_job_config_is_a_config_error(write_toml, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_module(tmp_path, "X = 1\n", "no_job_config")
    path = write_toml("plain.toml", f'[job]\ncustom_config_module = "{name}"\n')
    with pytest.raises(ConfigError, match=rf"{path}: .*custom_config_module '{name}' has no JobConfig"):
        parse(path)


def test_custom_import_runs_before_our_checks(tmp_path, monkeypatch):
    from torchtitan.hf_datasets.text_datasets import DATASETS

    from diffusion_blocks.data.text import TOKENIZERS

    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"tiny_{uuid.uuid4().hex[:8]}"
    # [data] tokenizer is checked against TOKENIZERS: passes only if the import came first
    text = tiny_dataset_module(name) + (
        "from diffusion_blocks.data.text import TOKENIZERS, ByteTokenizer\n"
        "TOKENIZERS[DATASET_NAME] = lambda job_config: ByteTokenizer()\n"
    ).replace("DATASET_NAME", repr(name))
    module = write_module(tmp_path, text, "tiny_data")
    try:
        cfg = parse(DEBUG_TOML, "--experimental.custom_import", module,
                    "--training.dataset", name, "--data.tokenizer", name)
        assert cfg.experimental.custom_import == module and cfg.data.tokenizer == name
        assert module in sys.modules and name in DATASETS
    finally:
        DATASETS.pop(name, None)
        TOKENIZERS.pop(name, None)


def test_custom_import_missing_is_a_config_error(write_toml):
    missing = f"no_such_module_{uuid.uuid4().hex[:8]}"
    path = write_toml("imp.toml", f'[experimental]\ncustom_import = "{missing}"\n')
    with pytest.raises(ConfigError, match=rf"^{path}: \[experimental\] custom_import '{missing}' cannot be imported: No module named"):
        parse(path)


def test_custom_import_dataset_trains_end_to_end(tmp_path):
    from _train_helpers import TINY, check_ok, output_of, torchrun, training_rows

    modules = tmp_path / "modules"
    module = write_module(modules, tiny_dataset_module("tiny_custom"), "tiny_data")
    out = tmp_path / "out"
    args = [
        "--job.config_file", str(DEBUG_TOML), *TINY, "--training.steps", "3",
        "--job.dump_folder", str(out), "--checkpoint.no_enable",
        "--metrics.no_enable_tensorboard", "--training.dataset", "tiny_custom",
    ]
    proc = torchrun([*args, "--experimental.custom_import", module],
                    timeout=300, extra_pythonpath=[modules])
    check_ok(proc)
    assert "Preparing tiny_custom dataset from in-memory" in output_of(proc)
    assert [r["step"] for r in training_rows(out / "metrics.jsonl")] == [1, 2, 3]

    proc = torchrun([*args, "--experimental.custom_import", "no_such_module_xyz"],
                    timeout=300, extra_pythonpath=[modules])
    assert proc.returncode != 0
    # the worker exits 2 with one line; the only traceback is torchrun's own ChildFailedError
    assert "(exitcode: 2)" in proc.stderr
    assert "ModuleNotFoundError" not in proc.stderr and "config/loader.py" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "custom_import 'no_such_module_xyz'" in errors[0]
    assert "command line (--experimental.custom_import)" in errors[0]
