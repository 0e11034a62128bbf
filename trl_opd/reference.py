"""The frozen initial student that Stable-OPD's `ref_kl_coef` term anchors to (Luo et al., arXiv 2604.08527).

Built once at construction, prepared like TRL prepares the teacher (DeepSpeed inference engine, or
`accelerator.prepare_model(..., evaluation_mode=True)` for DDP/FSDP). Under PEFT there is no copy: the student with
its adapter disabled is the reference. Under ZeRO-3 with `zero3_init_flag` the student's parameters are already
shards, so a deep copy would clone empty tensors (TRL refuses the same); the copy is then built from the student's
config under the same partitioned init and filled one gathered parameter at a time.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl.models import prepare_deepspeed

from .heads import OutputHead, Positions
from .hidden_states import HiddenStates


def _is_partitioned(model: torch.nn.Module) -> bool:
    return any(hasattr(parameter, "ds_id") for parameter in model.parameters())


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, eval-mode copy of `model` with its current weights, also when they are ZeRO-3 shards."""
    if not _is_partitioned(model):
        return copy.deepcopy(model).eval().requires_grad_(False)
    import deepspeed

    dtype = next(model.parameters()).dtype
    reference = type(model)._from_config(model.config, dtype=dtype)  # partitioned like the student (ZeRO-3 init)
    for source, target in zip(model.parameters(), reference.parameters(), strict=True):
        with deepspeed.zero.GatheredParameters([source, target], modifier_rank=0):
            target.data.copy_(source.data)
    return reference.eval().requires_grad_(False)


class InitialStudent:
    """The reference q_ref of the `ref_kl_coef` term: the student as it was when the trainer was built."""

    def __init__(self, trainer: Any, hidden_states: HiddenStates) -> None:
        self._unwrap = trainer.accelerator.unwrap_model
        self._hidden_states = hidden_states
        self.model: torch.nn.Module | None = None
        if not is_peft_model(trainer.model):
            reference = frozen_copy(trainer.model)
            if trainer.is_deepspeed_enabled:
                self.model = prepare_deepspeed(reference, trainer.accelerator)
            else:
                self.model = trainer.accelerator.prepare_model(reference, evaluation_mode=True)

    def at_positions(
        self, unwrapped_student: torch.nn.Module, inputs: dict[str, Any], mask: torch.Tensor, temperature: float
    ) -> Positions:
        """q_ref at the completion positions where `mask` (B, T) is True, at the student's `temperature`."""
        if self.model is None:  # PEFT: the base model without the adapter is the reference
            with torch.no_grad(), unwrapped_student.disable_adapter():
                hidden = self._hidden_states.trainable(unwrapped_student, inputs)
            head = OutputHead.from_model(unwrapped_student, temperature)
        else:
            unwrapped = self._unwrap(self.model)
            hidden = self._hidden_states.frozen(self.model, unwrapped, inputs)
            head = OutputHead.from_model(unwrapped, temperature)
        return Positions(hidden.to(mask.device)[mask], head)
