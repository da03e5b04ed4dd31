"""A dataset shorter than the run, through the real BlockwiseTrainer.train() in this
process (one gloo process group of size 1 for the module):

- the text datasets (torchtitan's HF text dataset, infinite for training) re-loop: a
  few-line dataset trains every step, and the log says it was re-looped;
- a finite dataloader that runs out stops the run with a one-line ConfigError naming
  the step, instead of torchtitan's early, successful-looking end (a warning, exit 0,
  and the steps since the last interval checkpoint never saved).
"""

import itertools
import logging
import uuid

import pytest
from datasets import Dataset
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

import _train_helpers as h
from diffusion_blocks import train
from diffusion_blocks.config.loader import parse_job_config
from diffusion_blocks.errors import ConfigError


@pytest.fixture
def make_trainer(process_group, tmp_path):
    def build(*extra: str) -> train.BlockwiseTrainer:
        return train.BlockwiseTrainer(parse_job_config([
            *h.CPU, "--job.config_file", str(h.DEBUG_TOML), *h.TINY,
            "--job.dump_folder", str(tmp_path), "--metrics.no_enable_tensorboard",
            "--checkpoint.no_enable", *extra,
        ]))

    with h.closing_trainers(build) as make:
        yield make


@pytest.fixture
def two_line_dataset():
    """A registered text dataset of 2 short lines: 12 byte tokens per pass, where one
    batch of 2 x (32 + 1) tokens needs more than 5 passes."""
    name = f"two_lines_{uuid.uuid4().hex[:8]}"
    DATASETS[name] = DatasetConfig(
        path="in-memory", loader=lambda path: Dataset.from_dict({"text": ["a b.", "c d."]}),
        sample_processor=lambda sample: sample["text"],
    )
    yield name
    DATASETS.pop(name, None)


def test_a_text_dataset_shorter_than_the_run_is_re_looped(make_trainer, two_line_dataset, tmp_path, caplog):
    trainer = make_trainer("--training.dataset", two_line_dataset, "--training.steps", "3")
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer.step == 3
    assert [r["step"] for r in h.training_rows(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert f"Dataset {two_line_dataset} is being re-looped" in caplog.text


def test_a_finite_dataloader_that_runs_out_stops_with_a_clear_error(make_trainer, tmp_path):
    trainer = make_trainer("--training.steps", "5", "--checkpoint.enable",
                           "--checkpoint.interval", "2")
    trainer.dataloader = list(itertools.islice(iter(trainer.dataloader), 3))  # 3 batches
    with pytest.raises(ConfigError) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith("command line (--training.steps): the training data ran out "
                              "at step 4 of [training] steps = 5"), message
    assert "\n" not in message
    # steps 1-3 were trained and logged; the interval checkpoint is the one saved
    assert [r["step"] for r in h.training_rows(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-2"]
