"""Validators: torchtitan's validation machinery (`[validation]` keys, its held-out
dataloader, schedule and metrics processor) for block-wise models.

- DenoiserValidator (LM): torchtitan's Validator; a denoiser is scored block by block
  on the same held-out batches, each block at sigmas drawn from the truncated
  log-normal on its own (widened) training interval with a fixed seed, one per sequence
  (whatever `block0_sigma_sampling` and `sigma_per_token` say), so figures are
  comparable across validations and across those settings.
  Logged: validation_metrics/loss (the mean of the blocks' weighted losses: the
  training objective under a uniform block choice), validation_metrics/ce, and
  validation_metrics/block{b}/loss and /ce. The end-to-end twin is validated by
  torchtitan's own code (plain next-token loss).
- TaskValidator (ViT, DiT): runs the task's `evaluate` hook (test accuracy, a sample
  grid) at torchtitan's validation steps and logs what it returns.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from torchtitan.components.validate import BaseValidator, Validator
from torchtitan.tools import utils as titan_utils
from torchtitan.tools.logging import logger

from ..protocols.task import EvalContext
from .dist_utils import sum_over_ranks

VALIDATION_SEED = 20_000




class DenoiserValidator(Validator):
    def __init__(self, *, task, **validator_kwargs):
        super().__init__(**validator_kwargs)
        self.task = task

    def held_out_batches(self) -> list:
        steps = self.job_config.validation.steps
        batches = []
        for input_dict, labels in self.validation_dataloader:
            if steps != -1 and len(batches) >= steps:
                break
            batches.append((input_dict, labels))
        return batches

    @torch.no_grad()
    def validate(self, model_parts, step: int) -> None:
        model = model_parts[0]
        partition = getattr(model, "partition", None)
        if partition is None:  # the end-to-end twin
            super().validate(model_parts, step)
            return
        model.eval()
        device = torch.device(titan_utils.device_type)
        rank = dist.get_rank() if dist.is_initialized() else 0
        batches = self.held_out_batches()
        totals = torch.zeros(partition.num_blocks, 3, dtype=torch.float64, device=device)
        for block in range(partition.num_blocks):
            sigma_generator = torch.Generator().manual_seed(VALIDATION_SEED + rank)
            noise_generator = torch.Generator(device).manual_seed(VALIDATION_SEED + 1 + rank)
            for input_dict, labels in batches:
                self.metrics_processor.ntokens_since_last_log += labels.numel()
                input_dict = {k: v.to(device) for k, v in input_dict.items()}
                labels = labels.to(device)
                sigma_B = partition.sample_reference_levels(block, labels.shape[0], sigma_generator)
                with self.validation_context(), self.maybe_enable_amp:
                    sums = self.task.denoiser_loss(
                        model, input_dict, labels, block,
                        sigma_B.to(device, torch.float32), noise_generator,
                    )
                totals[block] += torch.stack(
                    [sums.loss_sum.double(), sums.unweighted_sum.double(), sums.num_items.double()]
                )
        totals = sum_over_ranks(totals)
        items = totals[:, 2].clamp_min(1)
        loss_B, ce_B = (totals[:, 0] / items).tolist(), (totals[:, 1] / items).tolist()
        extra = {"validation_metrics/ce": sum(ce_B) / len(ce_B)}
        for block, (loss, ce) in enumerate(zip(loss_B, ce_B)):
            extra[f"validation_metrics/block{block}/loss"] = loss
            extra[f"validation_metrics/block{block}/ce"] = ce
        self.metrics_processor.log_validation(
            loss=sum(loss_B) / len(loss_B), step=step, extra_metrics=extra
        )
        logger.info(
            "  validation per block (weighted loss / ce): "
            + "  ".join(f"{b}: {loss:.4f} / {ce:.4f}" for b, (loss, ce) in enumerate(zip(loss_B, ce_B)))
        )
        model.train()


class TaskValidator(BaseValidator):
    def __init__(self, *, job_config, dp_world_size, dp_rank, metrics_processor, evaluate, **_):
        super().__init__(job_config)
        self.dp_world_size, self.dp_rank = dp_world_size, dp_rank
        self.metrics_processor = metrics_processor
        self.evaluate = evaluate

    @torch.no_grad()
    def validate(self, model_parts, step: int) -> None:
        model = model_parts[0]
        context = EvalContext(
            self.job_config, step, torch.device(titan_utils.device_type), self.dp_rank,
            self.dp_world_size, self.metrics_processor.logger,
        )
        model.eval()
        results = self.evaluate(model, context)
        model.train()
        if results:
            self.metrics_processor.logger.log(results, step)
            logger.info(f"validate step: {step}  " + "  ".join(f"{k}: {v:.4f}" for k, v in results.items()))


def build_denoiser_validator(task, **validator_kwargs) -> DenoiserValidator:
    return DenoiserValidator(task=task, **validator_kwargs)


def build_task_validator(evaluate, **validator_kwargs) -> TaskValidator:
    return TaskValidator(evaluate=evaluate, **validator_kwargs)
