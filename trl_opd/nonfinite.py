"""Non-finite values as one decision of every rank (`OPDConfig.nonfinite_policy`).

A rank that alone raised, or alone returned a zero cut off from the graph, would leave the other ranks waiting in a
collective. Instead every rank reports which of its inputs were NaN/inf (`nonfinite_codes`, one gather), and then all
raise the same `NonFiniteLossError` or all return `skipped_loss`, which the gradient reduction treats like any loss.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .heads import Positions

NONFINITE_SOURCES = ("student", "teacher", "reference", "gold", "loss")  # bit i of a rank's non-finite code


class NonFiniteLossError(FloatingPointError):
    """The teacher's or student's hidden states, or the loss, were NaN/inf (see `nonfinite_policy`)."""


def nonfinite_ranks(accelerator: Accelerator, sources: list[str]) -> dict[int, list[str]]:
    """Every rank's non-finite sources, {rank: [names]}, from one gather of a bit code per rank (empty lists when
    all are finite)."""
    code = sum(1 << NONFINITE_SOURCES.index(name) for name in sources)
    codes = accelerator.gather(torch.tensor([code], device=accelerator.device)).tolist()
    return {rank: [name for i, name in enumerate(NONFINITE_SOURCES) if c >> i & 1] for rank, c in enumerate(codes)}


def nonfinite_message(per_rank: dict[int, list[str]], global_step: int, micro_batch: int) -> str:
    """What was non-finite, where: the same sentence on every rank."""
    where = "; ".join(f"rank {rank}: {', '.join(names)}" for rank, names in per_rank.items() if names)
    seen = [name for name in NONFINITE_SOURCES if any(name in names for names in per_rank.values())]
    what = "loss" if seen == ["loss"] else f"{seen[0]} hidden states"
    return (
        f"Non-finite {what} at global step {global_step}, micro-batch {micro_batch} of the accumulation window "
        f"({where})."
    )


def skipped_loss(student: Positions) -> torch.Tensor:
    """A zero loss tied to every trainable parameter of the student (backbone through its hidden states, and its
    head), so that DDP, DeepSpeed and FSDP run their gradient reduction as on any other micro-batch."""
    head = student.head
    with maybe_gather_lm_head_ctx(head.weight, head.bias):
        tied = torch.nan_to_num(student.hidden, 0, 0, 0).sum() + head.weight.sum()
        return 0.0 * (tied if head.bias is None else tied + head.bias.sum())
