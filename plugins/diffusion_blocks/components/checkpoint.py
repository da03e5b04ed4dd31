"""torchtitan's CheckpointManager, guarded, and able to start a denoiser from a stock
llama3 checkpoint.

What `BlockwiseCheckpointManager` adds to torchtitan's saves and resumes:
- a save first checks that the model's parameters and buffers and the optimizer state
  are finite on every rank and refuses (FloatingPointError) otherwise: the newest
  checkpoint on disk stays the last finite one;
- every save writes the run's identity (run_identity.py) into its step folder first;
- a save that fails (no space left, permission denied) stops with one line naming the
  folder and the cause (CheckpointError); an async save's failure is logged when it
  happens and raised at the next save;
- a resume checks every `step-N` folder, newest first: one without `.metadata` (its
  save did not finish), with a missing or truncated shard, an unreadable `.metadata`
  or a load that fails is reported and the next older one is tried, and the log says
  which checkpoint the run resumed from; the saved identity must match the run's
  (ConfigError naming the key and both values). If step-N folders exist but none can
  be resumed from, the run stops (CheckpointError) instead of starting over, unless
  `[checkpoint] allow_fresh_start = true`.

`convert_to_denoiser` keeps every stock weight and adds modules (AdaLN-Zero in every
layer, the sigma embedder, the final AdaLN). A stock torchtitan llama3 checkpoint (DCP)
or a Hugging Face Llama checkpoint (safetensors, read through the train spec's
`Llama3StateDictAdapter`) lacks their keys, so torchtitan's strict load refuses it.

`BlockwiseCheckpointManager` loosens exactly one path: the model-only initial load
(`[checkpoint] initial_load_path` or `initial_load_in_hf` with
`initial_load_model_only = true`, before the run's checkpoint folder exists). There it
loads every weight the checkpoint has, leaves the modules added by the conversion
(the family's `added_by_conversion`, models.llama3.model.is_added_by_conversion for the
LM families) as initialised, and refuses, with one line,
any other missing key or any weight stored with another shape than the model's.
Resumes, seed checkpoints (step 0) and saves otherwise run torchtitan's code.
"""

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from torchtitan.components.checkpoint import AsyncMode, CheckpointManager, MODEL, OPTIMIZER
from torchtitan.tools.logging import logger

from ..errors import CheckpointError, ConfigError
from .dist_utils import to_local
from .run_identity import (
    check_identity, FAMILY_KEY, IDENTITY_FILE, identity_mismatches, read_identity, write_identity,
)

STEP_FOLDER = re.compile(r"step-(\d+)")
HF_INDEX = "model.safetensors.index.json"  # what torchtitan's last_save_in_hf writes


ADDED_MODULES = "AdaLN-Zero, sigma embedder, final AdaLN"
SHOWN_KEYS = 3


def _shape(size) -> tuple[int, ...]:
    return tuple(int(d) for d in size)


def _first(items: list[str]) -> str:
    more = len(items) - SHOWN_KEYS
    return ", ".join(items[:SHOWN_KEYS]) + (f" (and {more} more)" if more > 0 else "")


def check_against_checkpoint(
    wanted: dict[str, Any], stored: dict[str, Any], path: str
) -> None:
    """Raise ConfigError (one line) unless every key of `wanted` is stored with its shape.

    `wanted` maps keys to the model's tensors, `stored` is the checkpoint's
    state_dict_metadata (DCP, or the HF reader's).
    """
    missing = [k for k in wanted if k not in stored]
    if missing:
        first = missing[0]
        raise ConfigError(
            f"checkpoint {path} has no {_first(missing)} (this model has {first} as "
            f"{_shape(wanted[first].shape)}); only the modules the DiffusionBlocks "
            f"conversion adds ({ADDED_MODULES}) may be missing: it was saved from "
            "another model ([model] name / flavor / n_layers)"
        )
    mismatched = [
        k for k in wanted
        if not isinstance(stored[k], TensorStorageMetadata)
        or _shape(stored[k].size) != _shape(wanted[k].shape)
    ]
    if mismatched:
        first = mismatched[0]
        stored_as = (
            _shape(stored[first].size)
            if isinstance(stored[first], TensorStorageMetadata)
            else "a non-tensor object"
        )
        others = (
            f"; other shapes differ too: {_first(mismatched[1:])}" if mismatched[1:] else ""
        )
        raise ConfigError(
            f"checkpoint {path} stores {first} as {stored_as}, this model has "
            f"{_shape(wanted[first].shape)}{others}: it was saved from another model "
            "shape ([model] flavor / dim / n_layers)"
        )


def checkpoint_problem(step_folder: Path) -> str | None:
    """Why the DCP checkpoint in `step_folder` cannot be resumed from, without loading
    it; None when it looks complete (.metadata readable, every shard it names present
    and long enough, a readable identity file if any)."""
    if not (step_folder / ".metadata").is_file():
        if (step_folder / HF_INDEX).is_file():
            return "a Hugging Face export (last_save_in_hf), not a resumable checkpoint"
        return "no .metadata: its save did not finish"
    try:
        metadata = FileSystemReader(str(step_folder)).read_metadata()
    except Exception as error:  # any unpickling failure: the file is damaged
        return f".metadata cannot be read ({describe_error(error)})"
    needed: dict[str, int] = {}  # bytes each shard file must hold
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        shard = step_folder / name
        if not shard.is_file():
            return f"shard {name} is missing"
        if shard.stat().st_size < size:
            return f"shard {name} is truncated ({shard.stat().st_size} of {size} bytes)"
    try:
        read_identity(step_folder)
    except ConfigError as error:
        return str(error)
    return None


MODEL_ONLY = "a model-only save ([checkpoint] last_save_model_only): no optimizer or step state"


NON_MODEL_STATES = ("optimizer", "lr_scheduler", "train_state")


def is_model_only(step_folder: Path) -> bool:
    """A DCP save of the model's tensors only (no optimizer, scheduler or train_state
    entry), which loads for inference or as an initial load but cannot be resumed."""
    try:
        keys = FileSystemReader(str(step_folder)).read_metadata().state_dict_metadata
    except Exception:
        return False  # checkpoint_problem reports an unreadable .metadata
    return not any(key.startswith(NON_MODEL_STATES) for key in keys)


def model_only_remedy(run_folder: str, newest: str) -> str:
    return (
        f"to train on from these weights, start a new [job] dump_folder with "
        f"[checkpoint] initial_load_path = \"{newest}\" (the optimizer starts fresh), or "
        "save full checkpoints ([checkpoint] last_save_model_only = false) and resume "
        f"from the newest of those in {run_folder}"
    )


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict, DTensors by their local shard."""
    if isinstance(state, dict):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(v) for v in state)
    if torch.is_tensor(state):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


def step_numbers(run_folder: str | Path) -> list[int]:
    """The steps of a run folder's `step-N` folders, newest first."""
    steps = [
        int(match.group(1)) for name in os.listdir(run_folder)
        if (match := STEP_FOLDER.fullmatch(name))
        and os.path.isdir(os.path.join(run_folder, name))
    ]
    return sorted(steps, reverse=True)


def newest_usable_step_folder(run_folder: str | Path) -> tuple[Path | None, list[tuple[str, str]]]:
    """(the newest step folder of `run_folder` that checkpoint_problem finds nothing
    wrong with, or None; the (folder, problem) pairs of the newer ones skipped): the
    resume's order, for tools that read a run's checkpoints."""
    rejected: list[tuple[str, str]] = []
    for step in step_numbers(run_folder):
        folder = Path(run_folder) / f"step-{step}"
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, rejected
        rejected.append((str(folder), problem))
    return None, rejected


def _wrapped_errors(error: BaseException):
    """The exceptions a DCP CheckpointException wraps (per rank), else the error."""
    if isinstance(error, CheckpointException):
        for wrapped, _ in error.failures.values():
            yield from _wrapped_errors(wrapped)
    else:
        yield error


def describe_error(error: BaseException) -> str:
    """'Type: first line of the message' of the (first wrapped) error."""
    first = next(_wrapped_errors(error))
    if isinstance(first, OSError) and first.errno:
        where = f": {first.filename}" if first.filename else ""
        return f"{os.strerror(first.errno).lower()} (errno {first.errno}){where}"
    lines = str(first).strip().splitlines()
    return f"{type(first).__name__}: {lines[0]}" if lines else type(first).__name__


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind a failed save (directly, wrapped by DCP, or as a cause)."""
    for wrapped in _wrapped_errors(error):
        while wrapped is not None:
            if isinstance(wrapped, OSError):
                return wrapped
            wrapped = wrapped.__cause__ or wrapped.__context__
    return None




def _agree(local: Any) -> list[Any]:
    """Every rank's `local` (a collective when there is a process group of > 1)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [local]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def _no_key(key: str) -> bool:
    return False


class BlockwiseCheckpointManager(CheckpointManager):
    """torchtitan's CheckpointManager with the guards of this module's docstring, and
    a model-only initial load that accepts a stock llama3 checkpoint.

    `load` resumes from the newest usable step folder (each try is torchtitan's `load`
    of that step) and notes whether this is the model-only initial load, which
    `dcp_load` then does partially; every other load goes to torchtitan's strict
    `dcp_load`. `save` wraps torchtitan's `save`; `_async_wait` names the folder of a
    failed async save. The trainer calls `set_run` after building it.
    """

    _initial_model_only_load = False
    run_identity: dict[str, Any] | None = None
    allow_fresh_start = False
    on_restart: Callable[[int, str | None], None] | None = None
    _async_folder: str | None = None
    training_steps: int | None = None  # [training] steps: a resume must be below it

    def __init__(self, *args, added_by_conversion: Callable[[str], bool] | None = None, **kwargs):
        """torchtitan's arguments, and `added_by_conversion`: the model keys a stock
        checkpoint lacks (the family's ModelFamily.added_by_conversion; None: none)."""
        super().__init__(*args, **kwargs)
        self.added_by_conversion = added_by_conversion or _no_key

    def set_run(
        self,
        identity: dict[str, Any] | None,
        allow_fresh_start: bool,
        on_restart: Callable[[int, str | None], None] | None,
        training_steps: int | None = None,
    ) -> None:
        """The run's identity (written with every save, checked on resume), the
        `[checkpoint] allow_fresh_start` key, what to call once a resume has
        loaded step N from a checkpoint (or decided to start fresh: 0, None), and
        `[training] steps` (a resume from that step or a later one is refused)."""
        self.training_steps = training_steps
        self.run_identity = identity
        self.allow_fresh_start = allow_fresh_start
        self.on_restart = on_restart

    # -- resume --------------------------------------------------------------

    @torch.no_grad()
    def load(self, step: int = -1) -> bool:
        # torchtitan's load takes the initial (model-only) branch exactly when the run's
        # checkpoint folder does not exist yet; a resume or a step-0 seed stays strict.
        self._initial_model_only_load = (
            self.enable
            and not os.path.exists(self.folder)
            and self.initial_load_model_only
        )
        try:
            if not self.enable or not os.path.exists(self.folder):
                self._check_initial_load()
                return super().load(step)
            return self._resume(step)
        finally:
            self._initial_model_only_load = False

    def _step_folders(self) -> list[int]:
        return step_numbers(self.folder)

    def _resume(self, step: int) -> bool:
        """Load `step` ([checkpoint] load_step), or else the newest usable step folder."""
        steps = [step] if step != -1 else self._step_folders()
        if not steps:
            return False  # an empty run folder: a fresh run
        rejected: list[tuple[str, str]] = []
        load_failed = False
        for candidate in steps:
            folder = self._create_checkpoint_id(candidate)
            problem = (
                checkpoint_problem(Path(folder)) if os.path.isdir(folder)
                else "it does not exist"
            )
            if problem is None and candidate != 0 and is_model_only(Path(folder)):
                problem = MODEL_ONLY
            if problem is None:
                self._check_identity(folder)
                self._check_steps_left(candidate, folder)
                try:
                    super().load(candidate)
                except (ConfigError, FloatingPointError):
                    raise
                except (Exception, CheckpointException) as error:
                    problem, load_failed = f"loading it failed: {describe_error(error)}", True
            if problem is None:
                if rejected:
                    logger.warning(
                        f"Resumed from {folder}, the newest usable checkpoint (skipped: "
                        f"{rejected_listing(rejected)})"
                    )
                if self.on_restart is not None:
                    self.on_restart(candidate, folder)
                return True
            logger.warning(f"Checkpoint {folder} cannot be resumed from: {problem}")
            rejected.append((folder, problem))
        if step != -1:
            raise CheckpointError(
                f"[checkpoint] load_step = {step}: checkpoint {rejected[0][0]} cannot be "
                f"resumed from: {rejected[0][1]}"
            )
        if self.allow_fresh_start and not load_failed:
            logger.warning(
                f"No usable checkpoint in {self.folder} ({rejected_listing(rejected)}); starting "
                "at step 1 because [checkpoint] allow_fresh_start = true"
            )
            if self.on_restart is not None:
                self.on_restart(0, None)
            return False
        if all(problem == MODEL_ONLY for _, problem in rejected):
            remedy = model_only_remedy(self.folder, rejected[0][0])
        elif load_failed:
            remedy = (
                "a load that failed part-way may have changed this process's model, so "
                "it does not start fresh over them: move them out of the folder"
            )
        else:
            remedy = (
                "move them out of the folder, or set [checkpoint] allow_fresh_start = "
                "true to start at step 1 in it"
            )
        raise CheckpointError(
            f"{self.folder} holds checkpoints but none can be resumed from "
            f"({rejected_listing(rejected)}); not starting over from step 1: {remedy}"
        )

    def _check_initial_load(self) -> None:
        """`[checkpoint] initial_load_path` (DCP) with an identity file: a denoiser
        loads only into a denoiser of the same `[diffusion_blocks]` identity (the
        weights' names and shapes cannot tell another partition or noise range, nor
        stop a denoiser's stock weights loading into the end-to-end twin); an
        end-to-end or stock checkpoint is checked by names and shapes only (dcp_load)."""
        if not self.enable:  # torchtitan sets no initial_load_* attributes then
            return
        path = self.initial_load_path
        if not (path and self.run_identity) or self.initial_load_in_hf:
            return
        saved = read_identity(path)
        if not saved:
            return
        # another family (an MD4 model into the LM, ...), whatever its weights' names
        theirs, ours_family = saved.get(FAMILY_KEY), self.run_identity.get(FAMILY_KEY)
        if theirs and ours_family and theirs != ours_family:
            raise ConfigError(
                f"[checkpoint] initial_load_path {path} was trained as another model: a "
                f"{theirs} model ([model] name = {saved.get('model.name')!r}), and this run "
                f"trains {ours_family}. Start from a checkpoint of this model family"
            )
        if not saved.get("diffusion_blocks.enable"):
            return
        ours = {k: v for k, v in self.run_identity.items() if k.startswith("diffusion_blocks.")}
        mismatches = identity_mismatches(saved, ours)
        if mismatches:
            raise ConfigError(
                f"[checkpoint] initial_load_path {path} was trained as another model: "
                f"{'; '.join(mismatches)}. Use the settings it was trained with, or a "
                "checkpoint of this model"
            )

    def _check_steps_left(self, step: int, folder: str) -> None:
        if self.training_steps is not None and step >= self.training_steps:
            raise ConfigError(
                f"[training] steps = {self.training_steps} is at or below step {step}, "
                f"which this run resumes from ({folder}): nothing left to train; set "
                f"--training.steps above {step} to train further"
            )

    def _check_identity(self, folder: str) -> None:
        if self.run_identity is None:
            return
        advice = (
            "Resume with the checkpoint's settings, or start this run in a new "
            "[job] dump_folder"
        )
        if not check_identity(folder, self.run_identity, advice):
            logger.warning(
                f"Checkpoint {folder} has no {IDENTITY_FILE}: its model, partition and "
                "noise settings cannot be checked against this run's"
            )

    # -- save ----------------------------------------------------------------

    @torch.no_grad()
    def save(self, curr_step: int, last_step: bool = False) -> None:
        if not self._should_save(curr_step, last_step):
            return super().save(curr_step, last_step)  # e.g. torchft's per-replica save
        folder = self._create_checkpoint_id(curr_step)
        self._refuse_non_finite(folder)
        self._check_free_space(folder)
        try:
            self._write_identity(folder)
            super().save(curr_step, last_step)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as error:
            cause = os_error_in(error)
            if cause is None:
                raise
            raise _save_failed(folder, cause) from error
        if self.async_mode != AsyncMode.DISABLED and self.save_future is not None:
            self._async_folder = folder
            self.save_future.add_done_callback(_log_async_failure(folder))

    def _async_wait(self) -> None:
        try:
            super()._async_wait()
        except (Exception, CheckpointException) as error:
            cause = os_error_in(error)
            if cause is None:
                raise
            raise _save_failed(self._async_folder, cause) from error

    def _expected_save_bytes(self) -> int:
        """What the save will write: the newest step folder's size, else the bytes of
        the local model and optimizer tensors."""
        if os.path.isdir(self.folder):
            for step in step_numbers(self.folder):
                size = folder_bytes(Path(self.folder) / f"step-{step}")
                if size:
                    return size
        total = 0
        for name in (MODEL, "optimizer"):
            if name in self.states:
                total += tensor_bytes(self.states[name].state_dict())
        return total

    def _check_free_space(self, folder: str) -> None:
        """CheckpointError before writing when the checkpoint folder's filesystem has
        less free space than the save needs (a half-written step is worse than none)."""
        existing = Path(folder)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        free, needed = shutil.disk_usage(existing).free, self._expected_save_bytes()
        short = (free, needed) if free < needed else None
        # every rank stops, or none enters the collective save
        short = next((found for found in _agree(short) if found is not None), None)
        if short is not None:
            raise CheckpointError(
                f"cannot save checkpoint {folder}: no space left on device ({short[0]} bytes "
                f"free on its filesystem, the save needs about {short[1]}). Free space or "
                "set [checkpoint] folder / [job] dump_folder elsewhere"
            )

    def _refuse_non_finite(self, folder: str) -> None:
        """FloatingPointError on every rank when any rank holds a non-finite model
        tensor or optimizer state: nothing of this step is written."""
        found = []
        for part in self.states[MODEL].model:
            for name, tensor in (*part.named_parameters(), *part.named_buffers()):
                local = to_local(tensor)
                if local.is_floating_point() and not torch.isfinite(local).all():
                    found.append(name)
        for optimizer in self.states[OPTIMIZER]:
            for state in optimizer.state.values():
                for key, value in state.items():
                    if torch.is_tensor(value) and value.is_floating_point() and not (
                        torch.isfinite(to_local(value)).all()
                    ):
                        found.append(f"optimizer state {key}")
        names = sorted({name for rank_names in _agree(found) for name in rank_names})
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise FloatingPointError(
                f"refusing to save checkpoint {folder}: {', '.join(names[:3])}{more} "
                "hold non-finite values. The newest checkpoint on disk is still the last "
                "finite one; lower [optimizer] lr or [training] max_norm and resume from it"
            )

    def _write_identity(self, folder: str) -> None:
        """Rank 0 writes the run identity into the step folder; every rank raises when
        it could not (so no rank goes on into DCP's collective save alone)."""
        if self.run_identity is None:
            return
        error = None
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                write_identity(folder, self.run_identity)
            except OSError as e:
                error = e
        failures = [e for e in _agree(error) if e is not None]
        if failures:
            raise _save_failed(folder, failures[0])

    def dcp_load(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: str,
        from_hf: bool,
        from_quantized: bool,
    ) -> None:
        # the model states torchtitan's _states_to_load returns for a model-only load
        # (not the FT dataloader states, which _ft_load passes first)
        if not (
            self._initial_model_only_load
            and MODEL in self.states
            and state_dict is self.states[MODEL].state_dict()
        ):
            return super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)

        stock = {k: v for k, v in state_dict.items() if not self.added_by_conversion(k)}
        added = [k for k in state_dict if self.added_by_conversion(k)]
        if from_hf:
            loaded = self._load_stock_from_hf(stock, checkpoint_id, from_quantized)
            fresh = added
        else:
            stored = _dcp_metadata(checkpoint_id)
            # a model-only export of a denoiser has the added keys: load those too
            loaded = stock | {k: state_dict[k] for k in added if k in stored}
            fresh = [k for k in added if k not in stored]
            check_against_checkpoint(loaded, stored, checkpoint_id)
            self._refuse_extra_weights(state_dict, stored, checkpoint_id)
            dcp.load(loaded, checkpoint_id=checkpoint_id)
        # ModelWrapper.load_state_dict sets with strict=False: the fresh modules stay
        self.states[MODEL].load_state_dict(loaded)
        logger.info(
            f"loaded {len(state_dict) - len(fresh)} weights from {checkpoint_id}, "
            f"{len(fresh)} new ({ADDED_MODULES}) freshly initialised"
        )

    def _refuse_extra_weights(self, state_dict, stored, checkpoint_id: str) -> None:
        """A checkpoint with model weights this model lacks (more layers, a denoiser's
        AdaLN modules for the end-to-end twin) was saved from another model."""
        extra = [
            key for key in stored
            if key not in state_dict and key.split(".", 1)[0] not in self.states
        ]
        if extra:
            raise ConfigError(
                f"checkpoint {checkpoint_id} holds {len(extra)} weights this model lacks "
                f"(e.g. {extra[0]}): it was saved from another model ([model] name / "
                "flavor / n_layers, or a denoiser for the end-to-end twin)"
            )

    def _load_stock_from_hf(
        self, stock: dict[str, Any], checkpoint_id: str, from_quantized: bool
    ) -> dict[str, Any]:
        """torchtitan's HF branch of dcp_load on the stock weights; returns them native."""
        assert (
            self.sd_adapter is not None
        ), "trying to load checkpoint in HF safetensors format, but sd_adapter is not provided."
        hf_state_dict = self.sd_adapter.to_hf(stock)
        if not from_quantized:  # a quantized checkpoint stores other shapes (and scales)
            reader = self.sd_adapter.get_hf_storage_reader(checkpoint_id, from_quantized)
            stored = reader.read_metadata().state_dict_metadata
            check_against_checkpoint(hf_state_dict, stored, checkpoint_id)
        dcp.load(
            hf_state_dict,
            storage_reader=self.sd_adapter.get_hf_storage_reader(
                checkpoint_id, from_quantized
            ),
        )
        return self.sd_adapter.from_hf(hf_state_dict)


def _dcp_metadata(checkpoint_id: str) -> dict[str, Any]:
    try:
        return FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    except FileNotFoundError as error:
        raise ConfigError(
            f"checkpoint {checkpoint_id} is not a DCP checkpoint ({error}); for Hugging "
            "Face safetensors set [checkpoint] initial_load_in_hf = true"
        ) from error


def rejected_listing(rejected: list[tuple[str, str]]) -> str:
    return "; ".join(f"{Path(folder).name}: {problem}" for folder, problem in rejected)


def _save_failed(folder: str | None, cause: OSError) -> CheckpointError:
    return CheckpointError(
        f"cannot save checkpoint {folder}: {describe_error(cause)}. Free space or fix "
        "the permissions (or set [job] dump_folder / [checkpoint] folder elsewhere) and "
        "resume: the unfinished folder is skipped"
    )


def _log_async_failure(folder: str):
    def log(future) -> None:
        error = None if future.cancelled() else future.exception()
        if error is not None:
            logger.error(f"async checkpoint save of {folder} failed: {describe_error(error)}")

    return log
