"""What the trainer logs beside the loss, and how it is reduced across ranks.

- `MetricBuffer`: the (sum, count) of each `opd/` metric a micro-batch reports, reduced across ranks in one gather
  after the wrapped forward returns (a collective inside it risks a hang). The names are fixed before the forward
  from the config and the step alone, so every rank reduces the same list.
- `completion_rates`: TruncRate and RepRate of a generation batch (Luo et al., arXiv 2604.08527).
- `batch_diagnostics`: the token diagnostics of `trl_opd.diagnostics` on a sample of the loss positions, and the
  optional gradient-coherence probe; with several teachers, `per_teacher_metrics` reports the loss and those
  diagnostics per teacher (`opd/<metric>/<teacher name>`).
"""

from __future__ import annotations

from typing import Any

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .config import OPDConfig
from .diagnostics import (
    GRADIENT_COHERENCE,
    TOKEN_DIAGNOSTICS_LOGGED,
    head_gradient_coherence,
    repetition_rate,
    repetition_threshold,
    token_diagnostics,
    truncation_rate,
)
from .losses import divergence_of_logits
from .objective import LossBatch, Metrics, Objective, ObjectiveValue
from .teacher_routing import TeacherRouter
from .teachers import LocalTeacher, RoutedAnswer

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


def diagnostic_names(args: OPDConfig, teacher: str | None = None) -> list[str]:
    """The `opd/` metrics `batch_diagnostics` reports under `args` (for the named one of several teachers)."""
    names = [*TOKEN_DIAGNOSTICS_LOGGED, *([GRADIENT_COHERENCE] if args.diagnostics_gradient_coherence else [])]
    return [f"opd/{name}" + (f"/{teacher}" if teacher else "") for name in names]


def diagnosed_teachers(teacher: Any) -> list[str | None]:
    """The teachers whose token diagnostics can be computed: those held locally (the diagnostics compare whole
    distributions, a served or cached teacher gives only its top-k). [None] stands for a single local teacher."""
    if isinstance(teacher, TeacherRouter):
        return [name for name, one in teacher.teachers.items() if isinstance(one, LocalTeacher)]
    return [None] if isinstance(teacher, LocalTeacher) else []


def per_teacher_names(teacher: Any, args: OPDConfig, diagnose: bool) -> list[str]:
    """The metrics `per_teacher_metrics` reports: the loss per routed teacher, and with `diagnose` the diagnostics
    of each teacher that has them (fixed by the config and the step alone, identical on every rank)."""
    names = [f"opd/loss/{name}" for name in teacher.names] if isinstance(teacher, TeacherRouter) else []
    if diagnose:
        names += [metric for name in diagnosed_teachers(teacher) for metric in diagnostic_names(args, name)]
    return names


def per_teacher_metrics(
    batch: LossBatch,
    objective: Objective,
    value: ObjectiveValue,
    repeated: torch.Tensor | None,
    diagnosed: list[str | None],
    args: OPDConfig,
) -> Metrics:
    """The loss at each routed teacher's positions, and the diagnostics (`repeated` (N,): loss positions whose token
    repeats an earlier n-gram; None: no diagnostics) of each teacher in `diagnosed`, suffixed with its name."""
    metrics: Metrics = {}
    # One gather of every head for all the diagnostics (under ZeRO-3 each gather is a collective, so it must not
    # depend on whether this rank has positions of a teacher), entered on every rank when diagnostics are due.
    heads = batch.head_parameters() if repeated is not None else []
    with maybe_gather_lm_head_ctx(*heads):
        for name, index, part in batch.by_teacher():
            if isinstance(batch.teacher, RoutedAnswer):
                metrics[f"opd/loss/{name}"] = (value.per_position[index].detach().sum(), index.numel())
            if repeated is not None and name in diagnosed:
                part_repeated = repeated if index is None else repeated[index]
                suffix = f"/{name}" if name else ""
                diagnostics = batch_diagnostics(part, objective, part_repeated, args)
                metrics.update({metric + suffix: stat for metric, stat in diagnostics.items()})
    return metrics


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
def batch_diagnostics(batch: LossBatch, objective: Objective, repeated: torch.Tensor, args: OPDConfig) -> Metrics:
    """Overlap, entropies and log-ratios on ≤ `diagnostics_max_positions` evenly spaced loss positions of a batch with
    one local teacher (`repeated` (N,): whether each position's token repeats an earlier n-gram), and with
    `diagnostics_gradient_coherence` the coherence of the loss's head gradients on up to 64 of them.

    Evenly spaced rather than random: the diagnostics must not consume RNG draws that training depends on.
    """
    n = batch.student.hidden.shape[0]
    if n == 0:
        return {}
    picked = torch.linspace(0, n - 1, min(n, args.diagnostics_max_positions), device=repeated.device).long()
    student_hidden, teacher_hidden = batch.student.hidden[picked], batch.teacher.hidden[picked]
    student_logits, teacher_logits = (
        batch.student.head.logits(student_hidden),
        batch.teacher.head.logits(teacher_hidden),
    )
    token_ids = batch.token_ids[picked]
    stats = token_diagnostics(student_logits, teacher_logits, token_ids, args.diagnostics_top_k, repeated[picked])
    if args.diagnostics_gradient_coherence:
        few = slice(0, COHERENCE_POSITIONS)
        with torch.enable_grad():
            logits = student_logits[few].detach().requires_grad_(True)
            divergence = divergence_of_logits(logits, teacher_logits[few], objective.divergence, token_ids[few])
            (grads,) = torch.autograd.grad(divergence.sum(), logits)
        stats[GRADIENT_COHERENCE] = head_gradient_coherence(grads, student_hidden[few].detach())
    return {f"opd/{name}": (torch.tensor(value), 1) for name, value in stats.items()}
