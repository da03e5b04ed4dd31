"""Every config value checked at parse time (finite, in range, naming the file or flag
and the key), dataset paths read from the folder of the config file that names them,
and text files refused when they hold no usable text. (tests/test_probe_inputs.py runs
the same mistakes end to end through the entry points.)"""

from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA
from diffusion_blocks.config.bounds import Bounds, number_arg
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.data.text import check_json_records, check_text_file
from diffusion_blocks.errors import ConfigError

DEBUG_TOML = REPO / "train_configs" / "llama3_debug.toml"


def parse(path, *overrides, reads_data=False):
    return parse_job_config(["--job.config_file", str(path), *overrides], reads_data=reads_data)


def one_line_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        parse(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("text,expected", [
    # non-finite values passed before: inf trained to the end, nan showed up as "loss is nan"
    ("[diffusion_blocks]\nsigma_max = inf\n", "[diffusion_blocks] sigma_max must be a finite number > 0, got inf"),
    ("[diffusion_blocks]\np_mean = nan\n", "[diffusion_blocks] p_mean must be a finite number, got nan"),
    ("[diffusion_blocks]\nsigma_data = inf\n", "[diffusion_blocks] sigma_data must be a finite number > 0"),
    ("[diffusion_blocks]\np_std = inf\n", "[diffusion_blocks] p_std must be a finite number > 0"),
    ("[diffusion_blocks]\ncfg_scale = inf\n", "[diffusion_blocks] cfg_scale must be a finite number >= 0"),
    ("[diffusion_blocks]\np_mean = 40.0\n", "[diffusion_blocks] p_mean and p_std put 0 of ln(sigma)"),
    # torchtitan keys that failed late (a division by zero mid-run) or not at all
    ("[checkpoint]\nenable = true\ninterval = 0\n", "[checkpoint] interval must be >= 1, got 0"),
    ("[metrics]\nlog_freq = 0\n", "[metrics] log_freq must be >= 1, got 0"),
    ("[training]\nsteps = 0\n", "[training] steps must be >= 1, got 0"),
    ("[optimizer]\nlr = -0.001\n", "[optimizer] lr must be >= 0, got -0.001"),
    ("[optimizer]\nlr = nan\n", "[optimizer] lr must be a finite number >= 0, got nan"),
    ("[lr_scheduler]\nwarmup_steps = -5\n", "[lr_scheduler] warmup_steps must be >= 0, got -5"),
    ("[training.dataloader]\nnum_workers = -1\n", "[training] dataloader.num_workers must be >= 0"),
    ("[validation]\nenable = true\nsteps = 0\n", "[validation] validation steps must be positive or -1"),
    # image data for the language model failed in torchtitan's dataloader
    ('[training]\ndataset = "digits"\n', "[training] dataset 'digits' is not a registered text dataset"),
])
def test_value_out_of_range_names_file_section_key_and_range(write_toml, text, expected):
    path = write_toml("bad.toml", f'extends = "{DEBUG_TOML}"\n{text}')
    assert one_line_error(path).startswith(f"{path}: {expected}")


def test_value_from_the_command_line_names_the_flag():
    message = one_line_error(DEBUG_TOML, "--diffusion_blocks.sigma_data", "inf")
    assert message.startswith("command line (--diffusion_blocks.sigma_data): [diffusion_blocks] sigma_data")


def test_without_a_config_file_says_what_to_add():
    with pytest.raises(ConfigError, match=r"^no job config given: add --job.config_file"):
        parse_job_config([])


def test_extends_naming_a_folder_says_it_is_one(write_toml, tmp_path):
    path = write_toml("child.toml", 'extends = "."\n')
    assert one_line_error(path) == (
        f"{path}: 'extends' names {tmp_path}, which is a directory; name a TOML file"
    )


@pytest.mark.parametrize("flags,expected", [
    (["--training.stepz", "3"], "command line: Unrecognized options: --training.stepz, 3; perhaps you meant --training.steps"),
    (["--training.steps", "ten"], "command line: Error parsing --training.steps: invalid literal for int()"),
])
def test_torchtitan_cli_errors_are_one_line(flags, expected):
    assert one_line_error(DEBUG_TOML, *flags).startswith(expected)


def test_bounds_messages_and_argparse_type():
    assert Bounds(low=0, high=0.5).problem(float("nan")) == "must be a finite number in [0, 0.5], got nan"
    assert Bounds(low=1, special=(-1,), special_meaning="all").problem(0) == "must be >= 1, or -1 (all), got 0"
    assert Bounds(low=1, special=(-1,)).problem(-1) is None
    assert Bounds(low=0, low_open=True, allow_inf=True).problem(float("inf")) is None
    assert Bounds(low=0, low_open=True).problem(0.0) == "must be > 0, got 0"
    parse_steps = number_arg(int, Bounds(low=1))
    assert parse_steps("3") == 3
    for text, message in (("0", "must be >= 1, got 0"), ("x", "expected an integer, got 'x'")):
        with pytest.raises(Exception, match=message):
            parse_steps(text)


# ---------------------------------------------------------------------------
# Dataset paths


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from a folder that has nothing to do with the configs."""
    cwd = tmp_path / "somewhere_else"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


TEXT_FILE = '[training]\ndataset = "text_file"\ndataset_path = "{path}"\n'


def test_dataset_path_is_read_from_the_folder_of_the_file_that_names_it(write_toml, tmp_path, elsewhere):
    write_toml("configs/data/corpus.txt", "some text\n")
    write_toml("configs/base.toml", f'extends = "{DEBUG_TOML}"\n' + TEXT_FILE.format(path="data/corpus.txt"))
    child = write_toml("configs/runs/child.toml", 'extends = "../base.toml"\n[training]\nsteps = 3\n')
    job_config = parse(child, reads_data=True)
    assert job_config.training.dataset_path == str(tmp_path / "configs" / "data" / "corpus.txt")


def test_dataset_path_on_the_command_line_is_read_from_the_working_directory(elsewhere):
    (elsewhere / "mine.txt").write_text("some text\n")
    job_config = parse(DEBUG_TOML, "--training.dataset", "text_file",
                       "--training.dataset_path", "mine.txt", reads_data=True)
    assert job_config.training.dataset_path == str(elsewhere / "mine.txt")


def test_missing_dataset_names_key_file_and_resolved_path(write_toml, tmp_path, elsewhere):
    path = write_toml("job.toml", f'extends = "{DEBUG_TOML}"\n' + TEXT_FILE.format(path="../gone.txt"))
    parse(path)  # tools that only build the model do not need the data
    message = one_line_error(path, reads_data=True)
    assert message.startswith(f"{path}: [training] dataset_path {tmp_path.parent / 'gone.txt'} does not exist")


def test_shipped_text_config_finds_its_data_from_any_working_directory(elsewhere):
    job_config = parse(REPO / "train_configs" / "llama3_text.toml")
    assert Path(job_config.training.dataset_path).resolve() == (SHARED_DATA / "tinyshakespeare.txt").resolve()


def test_torchtitan_datasets_keep_their_dataset_path(elsewhere):
    """torchtitan reads its own datasets' dataset_path (a hub name or a path from the
    working directory): left as given."""
    job_config = parse(DEBUG_TOML, "--training.dataset", "c4_test",
                       "--training.dataset_path", "tests/assets/c4_test")
    assert job_config.training.dataset_path == "tests/assets/c4_test"


def test_stock_config_without_its_c4_test_folder_names_the_folder(elsewhere):
    """The shipped stock job run outside a torchtitan checkout: one line naming the
    dataset, the folder it looked in and the ways out, not torchtitan's traceback."""
    stock = REPO / "train_configs" / "llama3_torchtitan_debug_dblocks.toml"
    message = one_line_error(stock, "--data.tokenizer", "byte", reads_data=True)
    assert "[training] dataset = 'c4_test'" in message
    assert str(elsewhere / "tests" / "assets" / "c4_test") in message and "does not exist" in message
    (elsewhere / "tests" / "assets" / "c4_test").mkdir(parents=True)  # in a checkout: fine
    parse(stock, "--data.tokenizer", "byte", reads_data=True)


# ---------------------------------------------------------------------------
# Text files


@pytest.mark.parametrize("content,fragment", [
    (b"", "is empty"),
    (b" \n\n\t  \r\n", "holds only whitespace (8 bytes), no text"),
    (b"text\x00\x01\x02", "looks binary, not text (a NUL byte at byte 4)"),
    ("na\u00efve caf\u00e9\n".encode("latin-1"), "is not UTF-8 text (byte 2:"),
    ("ok \u00e9".encode("utf-8")[:-1], "is not UTF-8 text (it ends inside a multi-byte character)"),
])
def test_text_file_without_usable_text_is_refused(tmp_path, content, fragment):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^dataset file {path} "):
        check_text_file(str(path))
    with pytest.raises(ConfigError) as info:
        check_text_file(str(path))
    assert fragment in str(info.value)


def test_text_file_is_decoded_across_chunk_boundaries(tmp_path):
    """A multi-byte character cut by a chunk boundary is fine; a bad byte after the
    boundary is reported at its offset in the file."""
    path = tmp_path / "corpus.txt"
    path.write_bytes("a\u00e9\u00e9\u00e9 words\n".encode("utf-8"))
    check_text_file(str(path), chunk_bytes=2)
    path.write_bytes("a\u00e9\u00e9 ".encode("utf-8") + b"\xff")
    with pytest.raises(ConfigError, match=r"\(byte 6: b'\\xff'\)"):
        check_text_file(str(path), chunk_bytes=2)


@pytest.mark.parametrize("name,content,fragment", [
    ("c.jsonl", '{"text": "fine"}\n\n{"text": broken\n', "line 3 is not valid JSON"),
    ("c.jsonl", '{"text": "fine"}\n{"body": "b"}\n', "line 2 has no string 'text' field (keys ['body'])"),
    ("c.jsonl", '{"text": 5}\n', "line 1 has no string 'text' field"),
    ("c.jsonl", '["a list"]\n', "line 1 has no string 'text' field (list)"),
    ("c.jsonl", '{"text": " "}\n{"text": ""}\n', "every 'text' field is empty or whitespace"),
    ("c.json", '[{"text": "a"}, {"txt": "b"}]', "record 2 has no string 'text' field"),
])
def test_json_records_need_a_text_field(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        check_json_records(str(path))
    assert str(info.value).startswith(f"dataset file {path}: {fragment}")


def test_good_json_records_pass(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n')
    check_json_records(str(path))
    path = tmp_path / "c.json"
    path.write_text('[{"text": "one"}, {"text": "two"}]')
    check_json_records(str(path))


def test_a_user_mistake_under_torchrun_leaves_no_recorded_traceback(tmp_path, monkeypatch, capsys):
    """torchelastic's @record (on torchtitan's Trainer.__init__) writes the traceback of a
    ConfigError raised inside it to TORCHELASTIC_ERROR_FILE, and torchrun prints that file:
    the entry point removes it, so the one line is all the user reads."""
    from diffusion_blocks.errors import exit_on_config_error

    recorded = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(recorded))

    @exit_on_config_error
    def main():
        recorded.write_text('{"message": "Traceback ..."}')  # what @record leaves
        raise ConfigError("[training] steps: must be >= 1")

    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2 and not recorded.exists()
    assert capsys.readouterr().err == "error: [training] steps: must be >= 1\n"
