"""The probes `python -m tests.probes` runs (runner.py): each a user mistake (a config
value, a tool flag, a data file) or a fault, against one entry point, with the error
it must end in; and how an entry point is launched.

Adding a probe is one line in PROBES: a name, the entry point, its
arguments, and optionally `toml=` (lines of a job config that extends the entry's
tiny base config), `files=` (data files written next to that config; `trained_run`
writes a short run's checkpoints, optionally damaged) and `expect=`. Besides mistakes,
the list holds faults: a NaN blow-up, broken checkpoints, checkpoints of other settings.
"""

from __future__ import annotations

import io
import os
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


REPO = Path(__file__).resolve().parents[2]
PLUGINS = REPO / "plugins"
CONFIGS = REPO / "train_configs"

# entry point name -> ("module", dotted name) for `python -m`, or ("script", repo path)
ENTRY_POINTS = {
    "train": ("module", "diffusion_blocks.train"),
    "generate": ("script", "tools/generate.py"),
    "classify": ("script", "tools/classify.py"),
    "sample_images": ("script", "tools/sample_images.py"),
    "eval_dit": ("script", "tools/eval_dit.py"),
    "partition": ("script", "tools/partition.py"),
    "estimate_memory": ("script", "tools/bench/estimate_memory.py"),
    "bench_memory": ("script", "tools/bench/memory.py"),
    "bench_throughput": ("script", "tools/bench/throughput.py"),
    "lm_report": ("script", "tools/reports/lm.py"),
    "recurrent_report": ("script", "tools/reports/recurrent.py"),
}

# the shipped config a probe's job config extends, per entry point
BASE_CONFIGS = {
    "train": "llama3_debug.toml",
    "generate": "llama3_debug.toml",
    "classify": "vit_digits.toml",
    "sample_images": "dit_digits.toml",
    "eval_dit": "dit_digits.toml",
    "partition": "llama3_debug.toml",
    "estimate_memory": "llama3_debug.toml",
    "bench_memory": "llama3_debug.toml",
    "bench_throughput": "llama3_debug.toml",
}

# what every probe's config sets on top of its base: tiny, short, nothing written
# outside the probe's folder. A probe whose mistake slips through trains 2 steps.
TINY_CONFIG = """
[job]
dump_folder = "{dir}/out"
[training]
steps = 2
seq_len = 32
local_batch_size = 2
[lr_scheduler]
warmup_steps = 1
[checkpoint]
enable = false
[metrics]
log_freq = 1
enable_tensorboard = false
[validation]
enable = false
"""

NO_CHECKPOINT = ("--checkpoint", "{dir}/no_checkpoint")  # tools fail on flags before reading it


@dataclass(frozen=True)
class Probe:
    name: str
    entry: str                      # a key of ENTRY_POINTS, or "script:/path/to/file.py"
    args: tuple[str, ...] = ()      # "{dir}" is the probe's folder
    toml: str | None = ""           # job config lines (extending the entry's base); None: no config
    files: dict = field(default_factory=dict)  # name -> str | bytes | callable(path)
    expect: tuple[str, ...] = ()    # fragments the error line must contain
    base: str | None = None         # the shipped config to extend; default BASE_CONFIGS[entry]


def probe(name, entry, *args, toml="", files=None, expect=(), base=None) -> Probe:
    """One probe; `expect` a string or a tuple of strings."""
    expect = (expect,) if isinstance(expect, str) else tuple(expect)
    assert expect, f"probe {name}: say which error it expects, or it may pass for another"
    return Probe(name, entry, tuple(args), toml, dict(files or {}), expect, base)


def command_of(entry: str, argv: list[str]) -> list[str]:
    kind, target = entry_target(entry)
    if kind == "module":
        return [sys.executable, "-m", target, *argv]
    return [sys.executable, target, *argv]


def entry_target(entry: str) -> tuple[str, str]:
    if entry.startswith("script:"):
        return "script", entry[len("script:"):]
    kind, target = ENTRY_POINTS[entry]
    return kind, target if kind == "module" else str(REPO / target)


def probe_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGINS), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


# ---------------------------------------------------------------------------
# Data files the probes write


def png_bytes(size: int = 8, value: int = 128) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (size, size), value).save(buffer, format="PNG")
    return buffer.getvalue()


def npz_writer(**arrays) -> Callable[[Path], None]:
    """files= value: writes an .npz of these arrays (numpy imported when written)."""

    def write(path: Path) -> None:
        import numpy as np

        np.savez(path, **{k: v() if callable(v) else v for k, v in arrays.items()})

    return write


def digits_like(dtype="uint8", fill=None, count=20):
    """(count, 8, 8) images as `dtype`, optionally one pixel set to `fill`."""

    def make():
        import numpy as np

        images = (np.arange(count * 64).reshape(count, 8, 8) % 200).astype(dtype)
        if dtype.startswith("float"):
            images = images / 255.0
        if fill is not None:
            images[count // 2, 3, 3] = fill
        return images

    return make


def labels(values):
    def make():
        import numpy as np

        return np.asarray(values)

    return make


def image_folder(bad_file: str | None = None, bad_bytes: bytes = b"") -> Callable[[Path], None]:
    """files= value: <path>/<class>/<image>.png for classes 0 and 1, 10 images each;
    `bad_file` (e.g. '1/img_3.png') gets `bad_bytes` instead of a PNG."""

    def write(root: Path) -> None:
        for label in ("0", "1"):
            (root / label).mkdir(parents=True, exist_ok=True)
            for i in range(10):
                (root / label / f"img_{i}.png").write_bytes(png_bytes(value=40 + 100 * int(label)))
        if bad_file:
            (root / bad_file).write_bytes(bad_bytes)

    return write


def truncated_png() -> bytes:
    """A PNG whose header reads but whose pixel data stops two thirds in (Pillow opens
    it and fails only when it decodes)."""
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    data = buffer.getvalue()
    return data[: len(data) * 2 // 3]


TEXT_FILE = '[training]\ndataset = "text_file"\ndataset_path = "data.txt"\n'
NPZ = '[training]\ndataset = "npz"\ndataset_path = "data.npz"\n'
FOLDER = '[training]\ndataset = "image_folder"\ndataset_path = "images"\n'
VIT, DIT = "vit_digits.toml", "dit_digits.toml"


# ---------------------------------------------------------------------------
# The probes

# a lock of pid 1 (always alive) on this host: another run owns the probe's dump folder
LIVE_LOCK = '{"pid": 1, "host": "%s"}' % socket.gethostname()
JOB = "{dir}/job.toml: "  # errors about a key set in the probe's job config start so


# ---------------------------------------------------------------------------
# Faults: a trained run's checkpoints, damaged


_trained_runs: dict[tuple[str, ...], Path] = {}


def trained_run(*overrides: str, damage: Callable[[Path], None] | None = None):
    """files= value: a dump folder with checkpoints of a 2-step run of the debug LM
    (step-1, step-2; trained once per process and copied), then `damage(checkpoint
    folder)`."""

    def write(path: Path) -> None:
        import shutil
        import subprocess

        if overrides not in _trained_runs:
            cache = Path(tempfile.mkdtemp(prefix="probe_run_"))
            command = command_of("train", [
                "--job.config_file", str(CONFIGS / "llama3_debug.toml"), "--training.device", "cpu",
                "--training.steps", "2", "--training.seq_len", "32", "--training.local_batch_size", "2",
                "--lr_scheduler.warmup_steps", "1", "--checkpoint.enable", "--checkpoint.interval", "1",
                "--metrics.no_enable_tensorboard", "--validation.no_enable",
                "--job.dump_folder", str(cache), *overrides,
            ])
            subprocess.run(command, env=probe_env(), cwd=cache, check=True, capture_output=True)
            _trained_runs[overrides] = cache
        shutil.copytree(_trained_runs[overrides], path)
        if damage is not None:
            damage(path / "checkpoint")

    return write


def keep_only_the_last_save(checkpoints: Path) -> None:
    import shutil

    shutil.rmtree(checkpoints / "step-1")


def remove_every_metadata(checkpoints: Path) -> None:
    for metadata in checkpoints.glob("step-*/.metadata"):
        metadata.unlink()


def truncate_every_shard(checkpoints: Path) -> None:
    for shard in checkpoints.glob("step-*/*.distcp"):
        os.truncate(shard, shard.stat().st_size // 2)


RESUME = """
[job]
dump_folder = "{dir}/run"
[training]
steps = 4
[checkpoint]
enable = true
"""
RUN_CHECKPOINT = ("--checkpoint", "{dir}/run/checkpoint")


def cli(flag: str) -> str:
    return f"command line ({flag}): "


PROBES: list[Probe] = [
    # the job config itself
    probe("no_config_file", "train", toml=None, expect="add --job.config_file"),
    probe("config_file_missing", "train", "--job.config_file", "{dir}/nope.toml", toml=None,
          expect="{dir}/nope.toml does not exist"),
    probe("extends_directory", "train", toml='extends = "."\n', expect=(JOB, "is a directory")),
    probe("extends_missing", "train", toml='extends = "gone.toml"\n', expect=(JOB, "gone.toml")),
    probe("toml_syntax", "train", toml="[training\nsteps = 1\n", expect=(JOB, "not valid TOML")),
    probe("unknown_key", "train", toml="[training]\nstepz = 3\n", expect=(JOB, "did you mean steps")),
    probe("wrong_type", "train", toml='[training]\nsteps = "ten"\n', expect=(JOB, "expected int")),
    probe("cli_unknown_flag", "train", "--training.stepz", "3",
          expect="Unrecognized options: --training.stepz, 3; perhaps you meant --training.steps"),
    probe("cli_not_an_int", "train", "--training.steps", "ten", expect="--training.steps"),
    probe("cli_bad_choice", "train", "--training.dtype", "float8", expect="'--training.dtype'"),
    probe("model_llama3_without_converter", "train", toml='[model]\nname = "llama3"\n',
          expect=(JOB, 'converters = ["diffusion_blocks"]')),
    probe("model_unknown_flavor", "train", "--model.flavor", "huge", expect="[model] flavor = 'huge'"),
    probe("converter_unknown", "train", toml='[model]\nconverters = ["nope"]\n',
          expect=(JOB, "['nope'] are not registered")),
    probe("stock_llama3_without_tokenizer", "train", toml='[model]\nname = "llama3"\nflavor = "debugmodel"\n'
          'converters = ["diffusion_blocks"]\n[data]\ntokenizer = "auto"\n[diffusion_blocks]\nnum_blocks = 3\n',
          expect="[model] hf_assets_path = './tests/assets/tokenizer', which does not exist"),
    probe("hf_tokenizer_missing", "train", "--data.tokenizer", "hf", "--model.hf_assets_path",
          "{dir}/no_tokenizer", expect=(cli("--model.hf_assets_path"), "does not exist")),
    # [diffusion_blocks] and [data]: finite and in range
    probe("sigma_max_inf", "train", toml="[diffusion_blocks]\nsigma_max = inf\n",
          expect=JOB + "[diffusion_blocks] sigma_max must be a finite number"),
    probe("sigma_min_negative", "train", "--diffusion_blocks.sigma_min", "-1",
          expect=cli("--diffusion_blocks.sigma_min") + "[diffusion_blocks] sigma_min"),
    probe("p_mean_nan", "train", toml="[diffusion_blocks]\np_mean = nan\n",
          expect=JOB + "[diffusion_blocks] p_mean must be a finite number"),
    probe("p_mean_no_mass", "train", "--diffusion_blocks.p_mean", "40",
          expect=cli("--diffusion_blocks.p_mean") + "[diffusion_blocks] p_mean"),
    probe("p_std_inf", "train", "--diffusion_blocks.p_std", "inf",
          expect=cli("--diffusion_blocks.p_std") + "[diffusion_blocks] p_std must be a finite"),
    probe("p_std_zero", "train", toml="[diffusion_blocks]\np_std = 0.0\n",
          expect=JOB + "[diffusion_blocks] p_std must be > 0"),
    probe("sigma_data_inf", "train", toml="[diffusion_blocks]\nsigma_data = inf\n",
          expect=JOB + "[diffusion_blocks] sigma_data"),
    probe("overlap_nan", "train", "--diffusion_blocks.overlap", "nan",
          expect="[diffusion_blocks] overlap must be a finite number in [0, 0.5]"),
    probe("overlap_inf", "train", toml="[diffusion_blocks]\noverlap = inf\n",
          expect=JOB + "[diffusion_blocks] overlap"),
    probe("cfg_scale_inf", "train", toml="[diffusion_blocks]\ncfg_scale = inf\n", base=DIT,
          expect=JOB + "[diffusion_blocks] cfg_scale"),
    probe("cfg_scale_nan", "train", "--diffusion_blocks.cfg_scale", "nan", base=DIT,
          expect="[diffusion_blocks] cfg_scale"),
    probe("label_dropout_inf", "train", "--diffusion_blocks.label_dropout", "inf", base=DIT,
          expect="[diffusion_blocks] label_dropout"),
    probe("sampler_unknown", "train", toml='[diffusion_blocks]\nsampler = "rk4"\n', base=DIT,
          expect=JOB + "[diffusion_blocks] sampler 'rk4' is not one of ['euler', 'heun']"),
    probe("sampler_on_an_lm", "train", "--diffusion_blocks.sampler", "heun",
          expect="[diffusion_blocks] sampler = 'heun' is not read by dblocks_llama3"),
    # keys a family accepted without reading them (the allow-list, ModelFamily.reads)
    probe("cfg_scale_on_an_lm", "train", "--diffusion_blocks.cfg_scale", "3",
          expect="[diffusion_blocks] cfg_scale = 3.0 is not read by dblocks_llama3"),
    probe("adaln_cond_dim_on_the_vit", "train", toml="[diffusion_blocks]\nadaln_cond_dim = 64\n",
          base=VIT, expect=JOB + "[diffusion_blocks] adaln_cond_dim = 64 is not read by dblocks_vit"),
    probe("sigma_per_token_on_the_dit", "train", "--diffusion_blocks.sigma_per_token", base=DIT,
          expect="[diffusion_blocks] sigma_per_token = True is not read by dblocks_dit"),
    probe("num_blocks_zero", "train", "--diffusion_blocks.num_blocks", "0",
          expect="[diffusion_blocks] num_blocks must be >= 1"),
    probe("num_blocks_not_dividing", "train", "--diffusion_blocks.num_blocks", "3",
          expect=cli("--diffusion_blocks.num_blocks") + "[diffusion_blocks] num_blocks = 3 does not split"),
    probe("layers_per_block_sum", "train", toml="[diffusion_blocks]\nnum_blocks = 2\nlayers_per_block = [1, 2]\n",
          expect=JOB + "[diffusion_blocks] layers_per_block"),
    probe("seed_negative", "train", "--diffusion_blocks.seed", "-3", expect="[diffusion_blocks] seed"),
    probe("seed_huge", "train", toml="[diffusion_blocks]\nseed = 9223372036854775807\n",
          expect=JOB + "[diffusion_blocks] seed"),
    probe("sampling_steps_zero", "train", "--diffusion_blocks.sampling_steps", "0", base=DIT,
          expect="[diffusion_blocks] sampling_steps must be >= 1"),
    probe("holdout_fraction_one", "train", "--data.holdout_fraction", "1", base=VIT,
          expect="[data] holdout_fraction"),
    probe("shuffle_seed_negative", "train", "--data.shuffle_seed", "-1", base=VIT,
          expect="[data] shuffle_seed"),
    # torchtitan's sections: values that failed late or not at all
    probe("steps_zero", "train", "--training.steps", "0",
          expect=cli("--training.steps") + "[training] steps must be >= 1"),
    probe("local_batch_size_zero", "train", "--training.local_batch_size", "0",
          expect="[training] local_batch_size"),
    probe("seq_len_zero", "train", toml="[training]\nseq_len = 0\n", expect=JOB + "[training] seq_len"),
    probe("max_norm_negative", "train", "--training.max_norm", "-1", expect="[training] max_norm"),
    probe("max_norm_nan", "train", toml="[training]\nmax_norm = nan\n", expect=JOB + "[training] max_norm"),
    probe("gc_freq_zero", "train", "--training.gc_freq", "0", expect="[training] gc_freq"),
    probe("global_batch_size_not_multiple", "train", "--training.global_batch_size", "3",
          expect=cli("--training.global_batch_size") + "[training] global_batch_size"),
    probe("global_batch_size_zero", "train", "--training.global_batch_size", "0",
          expect="[training] global_batch_size"),
    probe("num_workers_negative", "train", toml="[training.dataloader]\nnum_workers = -1\n",
          expect=JOB + "[training] dataloader.num_workers"),
    probe("prefetch_without_workers", "train", toml="[training.dataloader]\nprefetch_factor = 2\n",
          expect=JOB + "[training] dataloader.prefetch_factor"),
    probe("lr_negative", "train", "--optimizer.lr", "-0.001", expect="[optimizer] lr must be >= 0"),
    probe("lr_inf", "train", toml="[optimizer]\nlr = inf\n", expect=JOB + "[optimizer] lr"),
    probe("lr_nan", "train", "--optimizer.lr", "nan", expect="[optimizer] lr"),
    probe("eps_negative", "train", "--optimizer.eps", "-1e-8", expect="[optimizer] eps"),
    probe("weight_decay_negative", "train", "--optimizer.weight_decay", "-0.1",
          expect="[optimizer] weight_decay"),
    probe("beta2_one", "train", "--optimizer.beta2", "1.0", expect="[optimizer] beta2"),
    probe("optimizer_unknown", "train", "--optimizer.name", "SGD", expect="[optimizer] name 'SGD'"),
    probe("warmup_negative", "train", "--lr_scheduler.warmup_steps", "-5",
          expect="[lr_scheduler] warmup_steps"),
    probe("decay_ratio_negative", "train", "--lr_scheduler.decay_ratio", "-0.5",
          expect="[lr_scheduler] decay_ratio"),
    probe("min_lr_factor_two", "train", "--lr_scheduler.min_lr_factor", "2",
          expect="[lr_scheduler] min_lr_factor"),
    probe("total_steps_zero", "train", "--lr_scheduler.total_steps", "0",
          expect="[lr_scheduler] total_steps"),
    probe("initial_load_path_missing", "train", "--checkpoint.enable", "--checkpoint.initial_load_path",
          "{dir}/no_such_step", expect="{dir}/no_such_step"),
    probe("checkpoint_interval_zero", "train", toml="[checkpoint]\nenable = true\ninterval = 0\n",
          expect=JOB + "[checkpoint] interval must be >= 1"),
    probe("keep_latest_k_one", "train", "--checkpoint.keep_latest_k", "1",
          expect="[checkpoint] keep_latest_k"),
    probe("log_freq_zero", "train", toml="[metrics]\nlog_freq = 0\n", expect=JOB + "[metrics] log_freq"),
    probe("validation_freq_zero", "train", toml="[validation]\nenable = true\nfreq = 0\n"
          'dataset = "synthetic_text"\nseq_len = 32\n', expect=JOB + "[validation] freq"),
    probe("validation_steps_zero", "train", toml="[validation]\nenable = true\nsteps = 0\n"
          'dataset = "synthetic_text"\nseq_len = 32\n',
          expect=JOB + "[validation] validation steps must be positive"),
    probe("validation_batch_zero", "train", toml="[validation]\nenable = true\nlocal_batch_size = 0\n"
          'dataset = "synthetic_text"\nseq_len = 32\n', expect=JOB + "[validation] local_batch_size"),
    probe("validation_seq_len_long", "train", toml="[validation]\nenable = true\nseq_len = 64\n"
          'dataset = "synthetic_text"\n', expect=JOB + "[validation] seq_len = 64"),
    probe("validation_path_missing", "train", toml="[validation]\nenable = true\nseq_len = 32\n"
          'dataset = "text_file"\ndataset_path = "held_out.txt"\n',
          expect=(JOB + "[validation] dataset_path", "{dir}/held_out.txt")),
    probe("profile_freq_below_warmup", "train",
          toml="[profiling]\nenable_profiling = true\nprofile_freq = 2\nprofiler_warmup = 3\n",
          expect=JOB + "[profiling] profile_freq"),
    probe("comm_timeout_zero", "train", "--comm.init_timeout_seconds", "0",
          expect="[comm] init_timeout_seconds"),
    probe("dp_shard_zero", "train", "--parallelism.data_parallel_shard_degree", "0",
          expect="[parallelism] data_parallel_shard_degree"),
    probe("tensor_parallel", "train", "--parallelism.tensor_parallel_degree", "2",
          expect="[parallelism] tensor_parallel_degree"),
    probe("ac_memory_budget_two", "train",
          toml='[activation_checkpoint]\nmode = "memory_budget"\nmemory_budget = 2.0\n',
          expect=JOB + "[activation_checkpoint] memory_budget"),
    probe("ac_memory_budget_uncompiled", "train", toml='[activation_checkpoint]\nmode = "memory_budget"\n',
          expect=JOB + "[activation_checkpoint] mode"),
    # datasets: registered; paths read from the folder of the config that names them
    probe("dataset_unknown", "train", "--training.dataset", "c5", expect="[training] dataset 'c5'"),
    probe("dataset_images_for_the_lm", "train", "--training.dataset", "digits",
          expect="[training] dataset 'digits' is not a registered text dataset"),
    probe("dataset_text_for_the_vit", "train", "--training.dataset", "synthetic_text", base=VIT,
          expect="[training] dataset 'synthetic_text' is not a registered image dataset"),
    probe("dataset_path_missing", "train", toml=TEXT_FILE,
          expect=(JOB + "[training] dataset_path", "{dir}/data.txt does not exist")),
    probe("dataset_path_missing_cli", "train", "--training.dataset", "text_file",
          "--training.dataset_path", "corpus.txt",
          expect=(cli("--training.dataset_path"), "{dir}/cwd/corpus.txt does not exist")),
    probe("dataset_path_not_set", "train", "--training.dataset", "text_file",
          expect=(cli("--training.dataset"), "[training] dataset = 'text_file' needs a dataset_path")),
    probe("dataset_path_in_parent", "train", toml='extends = "sub/parent.toml"\n',
          files={"sub/parent.toml": 'extends = "{dir}/tiny.toml"\n' + TEXT_FILE,
                 "data.txt": "beside the child, not beside the parent\n"},
          expect=("{dir}/sub/parent.toml: [training] dataset_path", "{dir}/sub/data.txt")),
    probe("npz_path_missing", "train", toml=NPZ, base=VIT,
          expect=(JOB + "[training] dataset_path", "{dir}/data.npz")),
    probe("image_folder_is_a_file", "train", toml=FOLDER, base=VIT, files={"images": "a file\n"},
          expect=("{dir}/images", "not a folder")),
    # text data
    probe("text_empty", "train", toml=TEXT_FILE, files={"data.txt": ""},
          expect="{dir}/data.txt is empty"),
    probe("text_whitespace", "train", toml=TEXT_FILE, files={"data.txt": " \n\n\t \n  \n"},
          expect="{dir}/data.txt holds only whitespace"),
    probe("text_binary", "train", toml=TEXT_FILE, files={"data.txt": bytes(range(256)) * 8},
          expect="{dir}/data.txt looks binary"),
    probe("text_not_utf8", "train", toml=TEXT_FILE,
          files={"data.txt": "caf\u00e9 au lait, d\u00e9j\u00e0 vu\n".encode("latin-1") * 20},
          expect="{dir}/data.txt is not UTF-8"),
    probe("jsonl_broken", "train", toml=TEXT_FILE.replace("data.txt", "data.jsonl"),
          files={"data.jsonl": '{"text": "fine"}\n{"text": broken\n'},
          expect="{dir}/data.jsonl: line 2 is not valid JSON"),
    probe("jsonl_no_text_field", "train", toml=TEXT_FILE.replace("data.txt", "data.jsonl"),
          files={"data.jsonl": '{"body": "a"}\n{"body": "b"}\n'},
          expect="{dir}/data.jsonl: line 1 has no string 'text' field"),
    # image data
    probe("png_truncated", "train", toml=FOLDER, base=VIT,
          files={"images": image_folder("1/img_3.png", truncated_png())},
          expect="{dir}/images/1/img_3.png is not a readable image: image file is truncated"),
    probe("png_not_an_image", "train", toml=FOLDER, base=VIT,
          files={"images": image_folder("0/img_5.png", b"not a png at all")},
          expect="{dir}/images/0/img_5.png is not a readable image"),
    probe("npz_float_labels", "train", toml=NPZ, base=VIT,
          files={"data.npz": npz_writer(images=digits_like(), labels=labels([0.0, 1.5] * 10))},
          expect="{dir}/data.npz: 'labels' has dtype float64"),
    probe("npz_labels_out_of_range", "train", toml=NPZ, base=VIT,
          files={"data.npz": npz_writer(images=digits_like(), labels=labels([0, 11] * 10))},
          expect=("{dir}/data.npz", "labels in [0, 11]")),
    probe("npz_negative_labels", "train", toml=NPZ, base=VIT,
          files={"data.npz": npz_writer(images=digits_like(), labels=labels([0, -1] * 10))},
          expect=("{dir}/data.npz", "labels in [-1, 0]")),
    probe("npz_nan_pixels", "train", toml=NPZ, base=VIT,
          files={"data.npz": npz_writer(images=digits_like("float32", float("nan")), labels=labels([0, 1] * 10))},
          expect="{dir}/data.npz: float 'images' has 1 non-finite pixels (nan"),
    probe("npz_inf_pixels", "train", toml=NPZ, base=VIT,
          files={"data.npz": npz_writer(images=digits_like("float64", float("inf")), labels=labels([0, 1] * 10))},
          expect="{dir}/data.npz: float 'images' has 1 non-finite pixels (inf"),
    probe("npz_not_an_archive", "train", toml=NPZ, base=VIT, files={"data.npz": b"PK\x03\x04 nope"},
          expect="{dir}/data.npz is not a readable .npz archive"),
    probe("npz_empty", "train", toml=NPZ, base=VIT, files={"data.npz": b""},
          expect="{dir}/data.npz is empty (0 bytes), not a .npz archive"),
    probe("npz_is_text", "train", toml=NPZ, base=VIT, files={"data.npz": "images, labels\n"},
          expect=("{dir}/data.npz is not a .npz archive", "starts with b'imag'")),
    probe("c4_test_outside_a_torchtitan_checkout", "train", "--training.dataset", "c4_test",
          expect=(cli("--training.dataset"), "[training] dataset = 'c4_test'", "does not exist")),
    probe("npz_2d_labels", "train", toml=NPZ, base=VIT,
          files={"data.npz": npz_writer(images=digits_like(), labels=labels([[0, 1]] * 20))},
          expect="{dir}/data.npz: 'labels' has shape (20, 2)"),
    # tools: flags in range, checked before anything is loaded
    probe("generate_max_new_tokens_negative", "generate", *NO_CHECKPOINT, "--max-new-tokens", "-5",
          expect="argument --max-new-tokens: must be >= 1, got -5"),
    probe("generate_steps_per_block_zero", "generate", *NO_CHECKPOINT, "--steps-per-block", "0",
          expect="argument --steps-per-block"),
    probe("generate_temperature_nan", "generate", *NO_CHECKPOINT, "--temperature", "nan",
          expect="argument --temperature"),
    probe("generate_top_k_negative", "generate", *NO_CHECKPOINT, "--top-k", "-1", expect="argument --top-k"),
    probe("generate_seed_words", "generate", *NO_CHECKPOINT, "--seed", "abc", expect="argument --seed"),
    probe("generate_sampler_unknown", "generate", *NO_CHECKPOINT, "--sampler", "rk4",
          expect="argument --sampler: invalid choice: 'rk4'"),
    probe("generate_checkpoint_missing", "generate", *NO_CHECKPOINT, expect="{dir}/no_checkpoint"),
    probe("generate_vit_config", "generate", *NO_CHECKPOINT, base=VIT, expect="'dblocks_vit'"),
    probe("generate_config_error", "generate", *NO_CHECKPOINT, "--diffusion_blocks.p_std", "-1",
          expect="[diffusion_blocks] p_std"),
    probe("classify_batch_size_zero", "classify", *NO_CHECKPOINT, "--batch-size", "0",
          expect="argument --batch-size"),
    probe("classify_steps_per_block_zero", "classify", *NO_CHECKPOINT, "--steps-per-block", "0",
          expect="argument --steps-per-block"),
    probe("classify_device_bogus", "classify", *NO_CHECKPOINT, "--device", "tpu9",
          expect="argument --device"),
    probe("classify_bad_data", "classify", *NO_CHECKPOINT, toml=NPZ,
          files={"data.npz": npz_writer(images=digits_like(), labels=labels([0.5] * 20))},
          expect="{dir}/data.npz: 'labels' has dtype float64"),
    probe("classify_sampler_unknown", "classify", *NO_CHECKPOINT, "--sampler", "rk4",
          expect="argument --sampler: invalid choice: 'rk4'"),
    probe("classify_on_dit_config", "classify", *NO_CHECKPOINT, base=DIT, expect="'dblocks_dit'"),
    probe("sample_images_sampler_unknown", "sample_images", *NO_CHECKPOINT, "--sampler", "rk4",
          expect="argument --sampler: invalid choice: 'rk4'"),
    probe("sample_images_steps_zero", "sample_images", *NO_CHECKPOINT, "--steps", "0",
          expect="argument --steps"),
    probe("sample_images_cfg_nan", "sample_images", *NO_CHECKPOINT, "--cfg-scale", "nan",
          expect="argument --cfg-scale"),
    probe("sample_images_per_class_zero", "sample_images", *NO_CHECKPOINT, "--per-class", "0",
          expect="argument --per-class"),
    probe("sample_images_scale_zero", "sample_images", *NO_CHECKPOINT, "--scale", "0",
          expect="argument --scale"),
    probe("sample_images_classes_words", "sample_images", *NO_CHECKPOINT, "--classes", "cat,dog",
          expect="argument --classes"),
    probe("sample_images_out_folder_missing", "sample_images", *NO_CHECKPOINT, "--out",
          "{dir}/no/such/grid.png", expect="argument --out"),
    probe("eval_dit_steps_zero", "eval_dit", *NO_CHECKPOINT, "--steps", "0", expect="argument --steps"),
    probe("eval_dit_samples_zero", "eval_dit", *NO_CHECKPOINT, "--samples-per-class", "0",
          expect="argument --samples-per-class"),
    probe("eval_dit_cfg_negative", "eval_dit", *NO_CHECKPOINT, "--cfg-scale", "1", "-2",
          expect="argument --cfg-scale"),
    probe("eval_dit_batch_zero", "eval_dit", *NO_CHECKPOINT, "--batch-size", "0",
          expect="argument --batch-size"),
    probe("eval_dit_sampler_unknown", "eval_dit", *NO_CHECKPOINT, "--sampler", "RK4",
          expect="argument --sampler: invalid choice: 'RK4'"),
    probe("eval_dit_grid_folder_missing", "eval_dit", *NO_CHECKPOINT, "--grid", "{dir}/no/grid.png",
          expect="argument --grid"),
    probe("partition_num_blocks_zero", "partition", "--num-blocks", "0", toml=None,
          expect="argument --num-blocks"),
    probe("partition_overlap_nan", "partition", "--num-blocks", "2", "--overlap", "nan", toml=None,
          expect="--overlap must be a finite number"),
    probe("partition_n_layers_zero", "partition", "--num-blocks", "2", "--n-layers", "0", toml=None,
          expect="argument --n-layers"),
    probe("partition_config_p_std_nan", "partition", toml="[diffusion_blocks]\np_std = nan\n",
          expect=JOB + "[diffusion_blocks] p_std"),
    probe("estimate_memory_nproc_zero", "estimate_memory", "--nproc", "0", expect="argument --nproc"),
    probe("estimate_memory_on_the_vit", "estimate_memory", base=VIT,
          expect="dblocks_vit is an image model (not supported)"),
    probe("estimate_memory_on_the_dit", "estimate_memory", base=DIT,
          expect="dblocks_dit is an image model (not supported)"),
    probe("estimate_memory_recurrent_blocks", "estimate_memory", "--blocks", "4",
          base="recurrent_debug.toml", expect="--blocks 4: dblocks_recurrent trains one block"),
    probe("estimate_memory_blocks_words", "estimate_memory", "--blocks", "2,x",
          expect="argument --blocks"),
    probe("estimate_memory_blocks_zero", "estimate_memory", "--blocks", "0", expect="argument --blocks"),
    probe("bench_memory_steps_negative", "bench_memory", "--steps", "-1", expect="argument --steps"),
    probe("bench_memory_ac_unknown", "bench_memory", "--ac", "none,most", expect="argument --ac"),
    probe("bench_throughput_steps_zero", "bench_throughput", "--steps", "0", expect="argument --steps"),
    probe("bench_throughput_modes_unknown", "bench_throughput", "--modes", "fast",
          expect="argument --modes"),
    probe("lm_report_data_missing", "lm_report", "--data", "{dir}/none.txt", "--out", "{dir}/out",
          toml=None, expect="argument --data"),
    probe("lm_report_data_binary", "lm_report", "--data", "{dir}/data.bin", "--out", "{dir}/out",
          toml=None, files={"data.bin": bytes(range(256))}, expect="{dir}/data.bin looks binary"),
    probe("lm_report_steps_zero", "lm_report", "--steps", "0", "--out", "{dir}/out", toml=None,
          expect="argument --steps"),
    probe("lm_report_too_long", "lm_report", "--prompt-len", "100", "--new-tokens", "100",
          "--data", "{dir}/data.txt", "--out", "{dir}/out", "--skip-training", toml=None,
          files={"data.txt": "To be, or not to be.\n" * 50}, expect="--new-tokens must be <="),
    probe("recurrent_report_row_unknown", "recurrent_report", "--row", "twin 3x", "--data",
          "{dir}/data.txt", "--out", "{dir}/out", "--skip-training", "--no-samples", toml=None,
          files={"data.txt": "To be, or not to be.\n" * 50},
          expect="--row 'twin 3x': no such row with these options; the rows are 'dblocks', 'twin'"),
    # faults: a blow-up, broken checkpoints, checkpoints of other settings, a busy folder
    probe("initial_load_path_without_the_checkpointer", "train",
          toml='[checkpoint]\nenable = false\ninitial_load_path = "{dir}/run/checkpoint/step-2"\n',
          expect="is set but [checkpoint] enable = false"),
    probe("dump_folder_locked_by_a_live_run", "train",
          files={"out/diffusion_blocks.lock": LIVE_LOCK},
          expect=("in use by the run of pid 1 on", "use another dump_folder")),
    probe("dump_folder_is_a_file", "train", files={"out": "a file\n"},
          expect="[job] dump_folder {dir}/out is a file, not a folder"),
    probe("nan_blowup_huge_lr", "train", toml="[optimizer]\nlr = 1e20\n[training]\nsteps = 10\n"
          "[checkpoint]\nenable = true\ninterval = 1\n",
          expect=("stopped", "nothing non-finite was saved", "sigma in")),
    probe("resume_every_checkpoint_incomplete", "train", toml=RESUME,
          files={"run": trained_run(damage=remove_every_metadata)},
          expect=("none can be resumed from", "no .metadata", "allow_fresh_start")),
    probe("resume_every_shard_truncated", "train", toml=RESUME,
          files={"run": trained_run(damage=truncate_every_shard)},
          expect=("none can be resumed from", "truncated")),
    probe("resume_other_sigma_max", "train", toml=RESUME + "[diffusion_blocks]\nsigma_max = 40.0\n",
          files={"run": trained_run()}, expect=("other settings", "sigma_max")),
    probe("resume_steps_not_above_the_checkpoint", "train", "--training.steps", "2", toml=RESUME,
          files={"run": trained_run()},
          expect=("[training] steps = 2 is at or below step 2", "--training.steps above 2")),
    probe("resume_a_model_only_last_save", "train", toml=RESUME,
          files={"run": trained_run("--checkpoint.last_save_model_only",
                                    damage=keep_only_the_last_save)},
          expect=("model-only save", "initial_load_path = ")),
    probe("resume_other_adaln_cond_dim", "train",
          toml=RESUME + "[diffusion_blocks]\nadaln_cond_dim = 64\n", files={"run": trained_run()},
          expect=("other settings", "adaln_cond_dim = 256 in the checkpoint, 64 here")),
    probe("generate_other_num_blocks", "generate", *RUN_CHECKPOINT,
          toml="[diffusion_blocks]\nnum_blocks = 2\n", files={"run": trained_run()},
          expect=("other settings", "num_blocks")),
    probe("generate_heun_on_an_end_to_end_checkpoint", "generate", *RUN_CHECKPOINT,
          "--sampler", "heun", toml="[diffusion_blocks]\nenable = false\n",
          files={"run": trained_run("--diffusion_blocks.no_enable")},
          expect="--sampler does not apply to dblocks_llama3 end to end"),
    probe("generate_end_to_end_on_blockwise", "generate", *RUN_CHECKPOINT,
          toml="[diffusion_blocks]\nenable = false\n", files={"run": trained_run()},
          expect=("other settings", "enable")),
]
