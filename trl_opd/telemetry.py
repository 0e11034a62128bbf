"""What the trainer logs beside the loss, and how it is reduced across ranks.

- `MetricBuffer`: the (sum, count) of each `opd/` metric a micro-batch reports, reduced across ranks in one gather
  after the wrapped forward returns (a collective inside it risks a hang). The names are fixed before the forward
  from the config and the step alone, so every rank reduces the same list.
- `completion_rates`: TruncRate and RepRate of a generation batch (Luo et al., arXiv 2604.08527).
- `batch_diagnostics`: the token diagnostics of `trl_opd.diagnostics` on a sample of the loss positions, and the
  optional gradient-coherence probe.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import OPDConfig
from .diagnostics import (
    GRADIENT_COHERENCE,
    TOKEN_DIAGNOSTICS_LOGGED,
    head_gradient_coherence,
    repeated_token_mask,
    repetition_rate,
    repetition_threshold,
    token_diagnostics,
    truncation_rate,
)
from .losses import divergence_of_logits
from .objective import LossBatch, Metrics, Objective

COHERENCE_POSITIONS = 64


class MetricBuffer:
    """The `opd/` metrics of the micro-batch being computed, as (sum, count) per name."""

    def __init__(self) -> None:
        self._pending: Metrics = {}

    def start(self, names: list[str]) -> None:
        """Expect `names`: each is reduced even if this rank records nothing for it (it then sends zeros)."""
        self._pending = dict.fromkeys(names, (torch.zeros(()), 0))

    def record(self, metrics: Metrics) -> None:
        """Keep each metric's (sum, count), detached, on the CPU."""
        self._pending.update({name: (total.detach().float().cpu(), count) for name, (total, count) in metrics.items()})

    def flush(self, accelerator: Any, sink: dict[str, list[float]]) -> None:
        """Reduce the kept metrics across ranks in one gather and append each mean to `sink[name]`."""
        if not self._pending:
            return
        names = list(self._pending)
        local = torch.tensor([[float(total), float(count)] for total, count in self._pending.values()])
        reduced = accelerator.gather_for_metrics(local.to(accelerator.device).unsqueeze(0)).sum(0)
        for name, (total, count) in zip(names, reduced.tolist()):
            if count > 0:
                sink[name].append(total / count)
        self._pending = {}


def diagnostics_due(args: OPDConfig, training: bool, micro_step: int, global_step: int) -> bool:
    """Token diagnostics run once per logging window: on the first micro-batch of the step that will log (always in
    evaluation), unless `diagnostics_max_positions` is 0."""
    if args.diagnostics_max_positions == 0:
        return False
    if not training:
        return True
    steps = args.logging_steps if args.logging_steps >= 1 else 1
    first_micro_batch = micro_step % max(args.gradient_accumulation_steps, 1) == 0
    return first_micro_batch and (global_step + 1) % int(steps) == 0


def diagnostic_names(args: OPDConfig) -> list[str]:
    """The `opd/` metrics `batch_diagnostics` reports under `args`."""
    names = [*TOKEN_DIAGNOSTICS_LOGGED, *([GRADIENT_COHERENCE] if args.diagnostics_gradient_coherence else [])]
    return [f"opd/{name}" for name in names]


def completion_rates(
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    tokenizer: Any,
    eos_token_ids: list[int],
    args: OPDConfig,
) -> torch.Tensor:
    """(truncated, repetitive, count) of this rank's completions, as a tensor to be summed across ranks."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(completion_ids, completion_mask)]
    tail = args.resolved_repetition_tail_chars
    threshold = args.repetition_threshold or repetition_threshold(tail)
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    return torch.tensor(
        [
            truncation_rate(rows, eos_token_ids, args.max_completion_length) * len(rows),
            repetition_rate(texts, tail, threshold) * len(rows),
            len(rows),
        ],
        device=completion_ids.device,
    )


@torch.no_grad()
def batch_diagnostics(
    batch: LossBatch, objective: Objective, completion_ids: torch.Tensor, mask: torch.Tensor, args: OPDConfig
) -> Metrics:
    """Overlap, entropies and log-ratios on ≤ `diagnostics_max_positions` evenly spaced loss positions, and with
    `diagnostics_gradient_coherence` the coherence of the loss's head gradients on up to 64 of them.

    Evenly spaced rather than random: the diagnostics must not consume RNG draws that training depends on.
    """
    n = batch.student.hidden.shape[0]
    if n == 0:
        return {}
    picked = torch.linspace(0, n - 1, min(n, args.diagnostics_max_positions), device=mask.device).long()
    student_hidden, teacher_hidden = batch.student.hidden[picked], batch.teacher.hidden[picked]
    student_logits, teacher_logits = (
        batch.student.head.logits(student_hidden),
        batch.teacher.head.logits(teacher_hidden),
    )
    token_ids = batch.token_ids[picked]
    repeated = repeated_token_mask(completion_ids.cpu()).to(mask.device)[mask][picked]
    stats = token_diagnostics(student_logits, teacher_logits, token_ids, args.diagnostics_top_k, repeated)
    if args.diagnostics_gradient_coherence:
        few = slice(0, COHERENCE_POSITIONS)
        with torch.enable_grad():
            logits = student_logits[few].detach().requires_grad_(True)
            divergence = divergence_of_logits(logits, teacher_logits[few], objective.divergence, token_ids[few])
            (grads,) = torch.autograd.grad(divergence.sum(), logits)
        stats[GRADIENT_COHERENCE] = head_gradient_coherence(grads, student_hidden[few].detach())
    return {f"opd/{name}": (torch.tensor(value), 1) for name, value in stats.items()}
