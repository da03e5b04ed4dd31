"""What is checked in the config before a run starts: one Bounds per numeric key, the
checks of each section (SECTION_CHECKS) and those that read several (JOB_CHECKS), the
dataset registry included. Each check returns (key, problem) or (section, key,
problem) triples; the loader (loader.py) reports the first."""

import math
import os

from torchtitan.hf_datasets.text_datasets import build_text_dataloader, DATASETS
from torchtitan.protocols.train_spec import get_train_spec

from ..data.images import build_image_dataloader, IMAGE_DATASETS, LOCAL_IMAGE_DATASETS
from ..data.text import LOCAL_TEXT_DATASETS, TOKENIZERS
from ..diffusion.lognormal import lognormal_cdf, SIGMA_LAWS
from ..diffusion.masking import check_masking_schedule
from ..diffusion.partition import EXPLICIT, PARTITION_NAMES
from ..diffusion.sampling import ODE_SAMPLERS
from ..errors import ConfigError, origin_of
from ..diffusion.schedules import BLOCK_SCHEDULES
from .bounds import (
    ANY_FINITE, AT_LEAST_1, Bounds, bounds_problems, NON_NEGATIVE, POSITIVE, SEED, UNIT_INTERVAL,
)
from .sections import (
    AUGMENTATIONS, Data, DEVICES, DiffusionBlocks, HEAD_LOSSES, NONFINITE_POLICIES, OFFLOAD_MODES,
    OPTIMIZERS, RECURRENCE_LAWS, Recurrent, SINGLE_DEGREE_PARALLELISMS, TIME_CONDITIONINGS,
)


# one Bounds per numeric key; keys that need each other are checked below
DIFFUSION_BLOCKS_BOUNDS = {
    "num_blocks": AT_LEAST_1,
    "overlap": Bounds(low=0, high=0.5),
    "sigma_min": POSITIVE,
    "sigma_max": POSITIVE,
    "p_mean": ANY_FINITE,
    "p_std": POSITIVE,
    "sigma_data": POSITIVE,
    "seed": SEED,
    "sampling_steps_per_block": AT_LEAST_1,
    "adaln_cond_dim": NON_NEGATIVE,
    "sampling_steps": AT_LEAST_1,
    "cfg_scale": NON_NEGATIVE,  # 1 = no guidance
    "label_dropout": Bounds(low=0, high=1, high_open=True),
    "self_conditioning": Bounds(low=0, high=1, high_open=True),
    "max_nonfinite_skips": NON_NEGATIVE,
    "head_loss_chunk_rows": AT_LEAST_1,
}
# the least share of the log-normal that must fall on [sigma_min, sigma_max]
MIN_SIGMA_MASS = 1e-6


def check_diffusion_blocks(section: DiffusionBlocks) -> list[tuple[str, str]]:
    """Model-independent checks. Returns (key, problem) pairs; empty when valid."""
    problems = bounds_problems(section, DIFFUSION_BLOCKS_BOUNDS)
    bad = {key for key, _ in problems}
    if not bad & {"sigma_min", "sigma_max"} and section.sigma_min >= section.sigma_max:
        problems.append(
            (
                "sigma_min",
                f"need 0 < sigma_min < sigma_max, got sigma_min={section.sigma_min}, "
                f"sigma_max={section.sigma_max}",
            )
        )
    elif not bad & {"sigma_min", "sigma_max", "p_mean", "p_std"}:
        schedule = section.noise_schedule()
        mass = lognormal_cdf(section.sigma_max, schedule) - lognormal_cdf(section.sigma_min, schedule)
        if mass < MIN_SIGMA_MASS:
            problems.append((
                "p_mean",
                f"and p_std put {mass:.3g} of ln(sigma) ~ N(p_mean={section.p_mean}, "
                f"p_std={section.p_std}^2) on [sigma_min, sigma_max] = [{section.sigma_min}, "
                f"{section.sigma_max}]; move p_mean inside [ln sigma_min, ln sigma_max] = "
                f"[{math.log(section.sigma_min):.3g}, {math.log(section.sigma_max):.3g}] "
                "or widen p_std",
            ))
    if section.partition not in PARTITION_NAMES:
        problems.append(
            ("partition", f"{section.partition!r} is not one of {PARTITION_NAMES}")
        )
    if section.sigma_boundaries and section.partition != EXPLICIT:
        problems.append(("sigma_boundaries", (
            f"is read only with partition = 'explicit' (partition is {section.partition!r}): "
            "set both, or neither")))
    if section.partition == EXPLICIT and not section.sigma_boundaries:
        problems.append(("partition", "= 'explicit' needs sigma_boundaries (the num_blocks - 1 inner boundaries)"))
    if any(not math.isfinite(s) or s <= 0 for s in section.sigma_boundaries):
        problems.append(("sigma_boundaries", f"must be positive finite numbers, got {list(section.sigma_boundaries)}"))
    if section.block_schedule not in BLOCK_SCHEDULES:
        problems.append(
            (
                "block_schedule",
                f"{section.block_schedule!r} is not one of {list(BLOCK_SCHEDULES)}",
            )
        )
    problems += check_block_weights(section)
    if section.sampler not in ODE_SAMPLERS:
        problems.append(("sampler", f"{section.sampler!r} is not one of {list(ODE_SAMPLERS)}"))
    if section.block0_sigma_sampling not in SIGMA_LAWS:
        problems.append((
            "block0_sigma_sampling",
            f"{section.block0_sigma_sampling!r} is not one of {list(SIGMA_LAWS)}",
        ))
    if section.sampling_sigma_max != 0 and not (
        section.sigma_min < section.sampling_sigma_max <= section.sigma_max
    ):
        problems.append((
            "sampling_sigma_max",
            f"must be 0 (= sigma_max) or lie in (sigma_min, sigma_max] = "
            f"({section.sigma_min}, {section.sigma_max}], got {section.sampling_sigma_max}",
        ))
    for key in ("target_embedding_scale", "token_embedding_init_std", "embedding_lr_multiplier"):
        value = getattr(section, key)
        if not (math.isfinite(value) and value > 0):
            problems.append((key, f"must be a finite number > 0, got {value}"))
    if section.offload_inactive_blocks not in OFFLOAD_MODES:
        problems.append((
            "offload_inactive_blocks",
            f"{section.offload_inactive_blocks!r} is not one of {list(OFFLOAD_MODES)}",
        ))
    if section.block_parallel and section.block_schedule != "random":
        problems.append(
            ("block_parallel", "trains every block every step; leave block_schedule at 'random'")
        )
    if section.on_nonfinite not in NONFINITE_POLICIES:
        problems.append((
            "on_nonfinite", f"{section.on_nonfinite!r} is not one of {list(NONFINITE_POLICIES)}"
        ))
    problems += check_head_loss(section)
    masking_problem = check_masking_schedule(section.masking_schedule)
    if masking_problem:
        problems.append(("masking_schedule", masking_problem))
    if section.time_conditioning not in TIME_CONDITIONINGS:
        problems.append((
            "time_conditioning",
            f"{section.time_conditioning!r} is not one of {list(TIME_CONDITIONINGS)}",
        ))
    if section.layers_per_block and len(section.layers_per_block) != section.num_blocks:
        problems.append(
            (
                "layers_per_block",
                f"has {len(section.layers_per_block)} entries but num_blocks is "
                f"{section.num_blocks}",
            )
        )
    if any(n < 1 for n in section.layers_per_block):
        problems.append(
            ("layers_per_block", f"every entry must be >= 1, got {section.layers_per_block}")
        )
    return problems


def check_block_weights(section: DiffusionBlocks) -> list[tuple[str, str]]:
    weights = section.block_weights
    if section.block_schedule != "weighted":
        if weights:
            return [("block_weights", f"is read only by block_schedule = 'weighted', "
                     f"but block_schedule is {section.block_schedule!r}")]
        return []
    if len(weights) != section.num_blocks:
        return [("block_weights", f"needs one weight per block (num_blocks = "
                 f"{section.num_blocks}), got {len(weights)}: {weights}")]
    if not all(math.isfinite(w) and w > 0 for w in weights):
        return [("block_weights", f"every weight must be a finite number > 0, got {weights}")]
    return []


def check_head_loss(section: DiffusionBlocks) -> list[tuple[str, str]]:
    if section.head_loss not in HEAD_LOSSES:
        return [("head_loss", f"{section.head_loss!r} is not one of {list(HEAD_LOSSES)}")]
    default_rows = DiffusionBlocks.head_loss_chunk_rows
    if section.head_loss != "chunked" and section.head_loss_chunk_rows != default_rows:
        return [("head_loss_chunk_rows", "is read only by head_loss = 'chunked', but "
                 f"head_loss is {section.head_loss!r}")]
    return []


RECURRENT_BOUNDS = {"mean_recurrence": AT_LEAST_1, "bptt_steps": AT_LEAST_1}


def check_recurrent(section: Recurrent) -> list[tuple[str, str]]:
    problems = bounds_problems(section, RECURRENT_BOUNDS)
    if section.recurrence_law not in RECURRENCE_LAWS:
        problems.append((
            "recurrence_law",
            f"{section.recurrence_law!r} is not one of {list(RECURRENCE_LAWS)}",
        ))
    return problems


def check_data(section: Data) -> list[tuple[str, str]]:
    allowed = ["auto", "hf", *TOKENIZERS]
    problems = []
    if section.tokenizer not in allowed:
        problems.append(("tokenizer", f"{section.tokenizer!r} is not one of {allowed}"))
    problems += bounds_problems(section, {
        "holdout_fraction": Bounds(low=0, high=1, low_open=True, high_open=True),
        "shuffle_seed": SEED,
        "crop_padding": NON_NEGATIVE,
    })
    if section.augment not in AUGMENTATIONS:
        problems.append(("augment", f"{section.augment!r} is not one of {list(AUGMENTATIONS)}"))
    return problems


def check_model(section) -> list[tuple[str, str]]:
    problems = []
    for key in ("dropout", "attention_dropout"):
        value = getattr(section, key)
        if value is None:
            continue
        if not 0.0 <= value < 1.0:
            problems.append((key, f"must lie in [0, 1), got {value}"))
        elif not _flavor_has(section, key):
            problems.append((key, f"is not a model arg of {section.name!r}; only the ViT has dropout"))
    return problems


def _flavor_has(section, key: str) -> bool:
    """Whether the train spec's flavor has model arg `key` (True when the spec is
    unknown here: torchtitan reports that itself)."""

    try:
        args = get_train_spec(section.name).model_args[section.flavor]
    except (KeyError, ValueError):
        return True
    return hasattr(args, key)


# ---------------------------------------------------------------------------
# torchtitan's sections: values its code would take and fail on late (a division by
# zero mid-run, a torch traceback) or not at all (a run of 0 steps)


def check_training(section) -> list[tuple[str, str]]:
    problems = []
    if section.device not in DEVICES:
        problems.append(("device", f"{section.device!r} is not one of {list(DEVICES)}"))
    problems += bounds_problems(section, {
        "steps": AT_LEAST_1,
        "local_batch_size": AT_LEAST_1,
        "global_batch_size": Bounds(low=1, special=(-1,), special_meaning="local x data-parallel"),
        "seq_len": AT_LEAST_1,
        "max_norm": Bounds(low=0, low_open=True, allow_inf=True),  # inf: no clipping
        "gc_freq": AT_LEAST_1,
        "dataloader.num_workers": NON_NEGATIVE,
        "dataloader.prefetch_factor": AT_LEAST_1,
    })
    loader = section.dataloader
    if loader.num_workers == 0 and loader.prefetch_factor is not None:
        problems.append(("dataloader.prefetch_factor", "needs dataloader.num_workers > 0"))
    if loader.num_workers == 0 and loader.persistent_workers:
        problems.append(("dataloader.persistent_workers", "needs dataloader.num_workers > 0"))
    return problems + dataset_problems(section)


def local_datasets() -> dict[str, str]:
    """Our datasets whose dataset_path names local files: what the path must be."""
    return {**LOCAL_TEXT_DATASETS, **LOCAL_IMAGE_DATASETS}


def dataset_problems(section) -> list[tuple[str, str]]:
    """A local-file dataset needs a `dataset_path` (whether the dataset is registered
    for the model is check_dataset_registered's; whether the path exists is
    dataset_path_problems', for the entry points that read it)."""
    what = local_datasets().get(section.dataset)
    if what and not section.dataset_path:
        return [("dataset", f"= {section.dataset!r} needs a dataset_path: {what}")]
    return []


# torchtitan's datasets read from a folder under the working directory (a torchtitan
# checkout) when dataset_path is not set: what the folder holds
TORCHTITAN_LOCAL_DATASETS = {"c4_test": "torchtitan's c4 test shard (tests/assets/c4_test of a torchtitan checkout)"}


def dataset_path_problems(job_config) -> list[tuple[str, str, str]]:
    """The local dataset files a run reads must exist (the loader has resolved the
    paths against the config files that set them)."""
    local = local_datasets()
    problems = []
    for name in ("training", "validation"):
        section = getattr(job_config, name)
        if name == "validation" and not section.enable:
            continue
        path = section.dataset_path
        if section.dataset in TORCHTITAN_LOCAL_DATASETS and section.dataset in DATASETS:
            folder = path or DATASETS[section.dataset].path
            if not os.path.exists(folder):
                problems.append((name, "dataset", (
                    f"= {section.dataset!r} reads {TORCHTITAN_LOCAL_DATASETS[section.dataset]} "
                    f"from {os.path.abspath(folder)}, which does not exist: run from a "
                    "torchtitan checkout, set dataset_path to that folder, or train on a "
                    "local file (dataset = 'text_file')"
                )))
        if section.dataset in local and path and not os.path.exists(path):
            problems.append((name, "dataset_path", (
                f"{path} does not exist (dataset = {section.dataset!r} reads "
                f"{local[section.dataset]}; a relative path is read from the folder of the "
                "config file that sets it)"
            )))
    return problems


def check_optimizer(section) -> list[tuple[str, str]]:
    problems = []
    if section.name not in OPTIMIZERS:
        problems.append(("name", f"{section.name!r} is not one of {list(OPTIMIZERS)}"))
    return problems + bounds_problems(section, {
        "lr": NON_NEGATIVE,
        "beta1": Bounds(low=0, high=1, high_open=True),
        "beta2": Bounds(low=0, high=1, high_open=True),
        "eps": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
    })


def check_lr_scheduler(section) -> list[tuple[str, str]]:
    return bounds_problems(section, {
        "warmup_steps": NON_NEGATIVE,
        "total_steps": AT_LEAST_1,
        "decay_ratio": UNIT_INTERVAL,
        "min_lr_factor": UNIT_INTERVAL,
    })


def check_checkpoint(section) -> list[tuple[str, str]]:
    problems = bounds_problems(section, {
        "interval": AT_LEAST_1,
        # torchtitan keeps >= 2: the newest may still be being written
        "keep_latest_k": Bounds(low=2, special=(0,), special_meaning="keep all"),
        "load_step": Bounds(low=0, special=(-1,), special_meaning="the newest"),
    })
    path = section.initial_load_path
    if path and not section.enable:
        problems.append((
            "initial_load_path",
            f"{path} is set but [checkpoint] enable = false: torchtitan would silently "
            "not load it; set [checkpoint] enable = true (the checkpointer loads it) or "
            "remove it",
        ))
    if section.enable and path and not os.path.isdir(path):
        problems.append((
            "initial_load_path",
            f"{path} is not a folder (a DCP step-N folder, or a Hugging Face folder with "
            "initial_load_in_hf; read from the working directory, as torchtitan does)",
        ))
    return problems


def check_metrics(section) -> list[tuple[str, str]]:
    return bounds_problems(section, {"log_freq": AT_LEAST_1})


def check_validation(section) -> list[tuple[str, str]]:
    if not section.enable:
        return []
    problems = bounds_problems(section, {
        "freq": AT_LEAST_1,
        "steps": Bounds(low=1, special=(-1,), special_meaning="the whole validation set"),
        "local_batch_size": AT_LEAST_1,
        "seq_len": AT_LEAST_1,
    })
    return problems + dataset_problems(section)


def check_profiling(section) -> list[tuple[str, str]]:
    if not section.enable_profiling:
        return []
    problems = bounds_problems(section, {
        "profile_freq": AT_LEAST_1, "profiler_active": AT_LEAST_1, "profiler_warmup": NON_NEGATIVE,
    })
    if not problems and section.profile_freq < section.profiler_warmup + section.profiler_active:
        problems.append((
            "profile_freq",
            f"must be >= profiler_warmup + profiler_active = "
            f"{section.profiler_warmup + section.profiler_active}, got {section.profile_freq}",
        ))
    return problems


def check_comm(section) -> list[tuple[str, str]]:
    return bounds_problems(section, {
        "init_timeout_seconds": AT_LEAST_1,
        "train_timeout_seconds": AT_LEAST_1,
        "trace_buf_size": NON_NEGATIVE,
    })


def check_parallelism(section) -> list[tuple[str, str]]:
    problems = bounds_problems(section, {
        "data_parallel_replicate_degree": AT_LEAST_1,
        "data_parallel_shard_degree": Bounds(low=1, special=(-1,), special_meaning="the rest"),
    })
    for key in SINGLE_DEGREE_PARALLELISMS:
        degree = getattr(section, key)
        if degree != 1:
            problems.append((
                key,
                f"= {degree}: DiffusionBlocks trains one block per step with data "
                "parallelism (FSDP2); set it to 1 and use data_parallel_shard_degree / "
                "data_parallel_replicate_degree",
            ))
    return problems


def check_activation_checkpoint(section) -> list[tuple[str, str]]:
    return bounds_problems(section, {"memory_budget": UNIT_INTERVAL})


SECTION_CHECKS = {
    "diffusion_blocks": check_diffusion_blocks,
    "data": check_data,
    "training": check_training,
    "model": check_model,
    "optimizer": check_optimizer,
    "lr_scheduler": check_lr_scheduler,
    "checkpoint": check_checkpoint,
    "metrics": check_metrics,
    "validation": check_validation,
    "profiling": check_profiling,
    "comm": check_comm,
    "parallelism": check_parallelism,
    "activation_checkpoint": check_activation_checkpoint,
    "recurrent": check_recurrent,
}


def check_memory_budget_needs_compile(job_config) -> list[tuple[str, str, str]]:
    ac, compile_config = job_config.activation_checkpoint, job_config.compile
    if ac.mode == "memory_budget" and not (
        compile_config.enable and "model" in compile_config.components
    ):
        return [("activation_checkpoint", "mode",
                 "= 'memory_budget' works on the compiled model: set [compile] enable = true "
                 "(with 'model' in components) or pick another mode")]
    return []


def check_dataset_registered(job_config) -> list[tuple[str, str, str]]:
    """[training] dataset (and an enabled [validation] dataset of a text model) must be
    registered for the kind of data the model's train spec reads: torchtitan's text
    datasets, or our image datasets."""

    name = job_config.model.name
    try:
        spec = get_train_spec(name)
    except (ValueError, ImportError):
        return []  # not a model we train: resolve_run_spec says so, with the choices
    if spec.build_dataloader_fn not in (build_text_dataloader, build_image_dataloader):
        return []  # a dataloader of the user's: its datasets are its own
    images = spec.build_dataloader_fn is build_image_dataloader
    registry, kind = (IMAGE_DATASETS, "image") if images else (DATASETS, "text")
    # image models validate on the training dataset's test split
    sections = ["training"] if images or not job_config.validation.enable else ["training", "validation"]
    problems = []
    for section in sections:
        dataset = getattr(job_config, section).dataset
        if dataset not in registry:
            problems.append((section, "dataset", (
                f"{dataset!r} is not a registered {kind} dataset ([model] name {name!r} reads "
                f"{kind} data); available: {sorted(registry)}"
            )))
    return problems


# checks that read several sections: (section, key, problem) triples
JOB_CHECKS = [check_memory_budget_needs_compile, check_dataset_registered]


def check_validation_seq_len(job_config) -> None:
    """[validation] seq_len longer than the model's position table (its [training]
    seq_len) is refused in one line: the trainer's validation and the tools that read
    the [validation] data (tools/eval_bpc.py) would fail deep in the attention."""
    validation, training = job_config.validation, job_config.training
    if validation.seq_len > training.seq_len:
        raise ConfigError(
            f"{origin_of(job_config, 'validation', 'seq_len')}: [validation] seq_len = "
            f"{validation.seq_len} is longer than [training] seq_len = {training.seq_len}, "
            "the longest sequence the model's position table covers; set it <= "
            f"{training.seq_len}"
        )
