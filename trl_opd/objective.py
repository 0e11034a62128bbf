"""The training objective, declared in one place: the terms of the loss, their coefficients and formulas.

Per micro-batch, over the N loss positions t (completion tokens that are not masked out) and the M tokens of the
dataset's gold completions (docs/concepts.md):

    loss = (1/N̂) Σ_t [ D(q_θ, p_T)_t + c_ref · KL(q_θ‖q_ref)_t + c_eopd · 1[H(p_T)_t > τ] · KL(p̄_T‖q̄_θ)_t ]
         + c_gold · (1/M̂) Σ_m −log q_θ(y_m)

D is the `Divergence` chosen by `kl_direction`/`loss_support`; N̂ and M̂ are the counts over the global batch as TRL
normalises them. Each term is a `Term`: its name, the `OPDConfig` field of its coefficient (a term whose coefficient
is 0 is not evaluated), its reference formula in `trl_opd.losses` (on explicit logits) and its fast path in
`trl_opd.chunked` (on hidden states), which the tests check against the reference. `Objective.from_args` builds the
objective from the config at every step, so that schedules changing a knob take effect at once.

With several teachers (`teachers.RoutedAnswer`) the terms that read the teacher are evaluated per teacher, on the
positions of its rows, and put back in position order: the loss is the same sum, each position against its own
teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from trl.trainer.utils import maybe_gather_lm_head_ctx

from . import chunked, losses
from .config import OPDConfig
from .heads import Positions
from .losses import Divergence
from .teachers import Answer, RoutedAnswer, TeacherTopK

Metrics = dict[str, tuple[torch.Tensor, int]]  # opd/<name> → (sum over items, number of items)


@dataclass(frozen=True)
class LossBatch:
    """What the objective reads for one micro-batch: each model's distributions at the positions its terms need."""

    student: Positions  # q_θ at the N loss positions, hidden states with gradient
    teacher: Answer | RoutedAnswer  # p_T at the same positions (served or cached: top-k only; several: per teacher)
    token_ids: torch.Tensor  # (N,) the prefix tokens there
    reference: Positions | None = None  # q_ref at the same positions, for the reference-KL term
    gold: Positions | None = None  # q_θ at the M gold-completion tokens, for the gold-SFT term
    gold_ids: torch.Tensor | None = None  # (M,)

    @property
    def answers(self) -> list[Answer]:
        """The teacher's answer, or each teacher's."""
        if isinstance(self.teacher, RoutedAnswer):
            return [answer for _, _, answer in self.teacher.parts]
        return [self.teacher]

    def by_teacher(self) -> list[tuple[str | None, torch.Tensor | None, LossBatch]]:
        """(teacher name, position index, the batch at those positions with that teacher alone) per teacher; one
        teacher: [(None, None, self)]. The gold completions stay with the whole batch."""
        if not isinstance(self.teacher, RoutedAnswer):
            return [(None, None, self)]
        parts = []
        for name, index, answer in self.teacher.parts:
            student = Positions(self.student.hidden[index], self.student.head)
            reference = (
                None if self.reference is None else Positions(self.reference.hidden[index], self.reference.head)
            )
            parts.append((name, index, LossBatch(student, answer, self.token_ids[index], reference)))
        return parts

    def placeholder(self) -> LossBatch:
        """A one-position, one-gold-token stand-in of zero hidden states (and a uniform top-k teacher).

        A term evaluated on it runs the same kernels as on real positions, and their backward gathers ZeRO-3 heads
        collectively: a rank holding no position (of some teacher) evaluates the stand-in, weighted 0, so that every
        rank enters as many gathers as the others.
        """

        def one(positions: Positions | None) -> Positions | None:
            if positions is None:
                return None
            return Positions(positions.hidden.new_zeros(1, positions.hidden.shape[-1]), positions.head)

        teacher = self.teacher
        if isinstance(teacher, TeacherTopK):
            k = teacher.ids.shape[-1]
            uniform = torch.full((1, k), -math.log(k), device=teacher.log_probs.device)
            teacher = TeacherTopK(torch.arange(k, device=teacher.ids.device)[None], uniform, uniform[:, 0])
        elif isinstance(teacher, RoutedAnswer):
            index = self.token_ids.new_zeros(1)
            stand_ins = (
                LossBatch(self.student, answer, self.token_ids).placeholder() for _, _, answer in teacher.parts
            )
            teacher = RoutedAnswer(
                tuple((name, index, stand_in.teacher) for (name, _, _), stand_in in zip(teacher.parts, stand_ins))
            )
        else:
            teacher = one(teacher)
        gold_ids = None if self.gold_ids is None else self.gold_ids.new_zeros(1)
        token_ids = self.token_ids.new_zeros(1)
        return LossBatch(one(self.student), teacher, token_ids, one(self.reference), one(self.gold), gold_ids)

    def nonfinite(self) -> list[str]:
        """Which models' hidden states (or a top-k teacher's log-probabilities) hold NaN/inf."""
        models = [("student", self.student), *(("teacher", answer) for answer in self.answers)]
        models += [("reference", self.reference), ("gold", self.gold)]
        bad = []
        for name, value in models:
            if isinstance(value, Positions):
                finite = bool(torch.isfinite(value.hidden).all())
            else:
                finite = not (isinstance(value, TeacherTopK) and value.nonfinite())
            if not finite and name not in bad:
                bad.append(name)
        return bad

    def head_parameters(self) -> list[torch.Tensor]:
        """Every output-head weight and bias the terms read, each once (gathered together under ZeRO-3)."""
        heads = [p.head for p in (self.student, *self.answers, self.reference) if isinstance(p, Positions)]
        tensors = [tensor for head in heads for tensor in (head.weight, head.bias) if tensor is not None]
        return list({id(tensor): tensor for tensor in tensors}.values())


class TermValue(NamedTuple):
    """One term on a batch: per-item values with gradient, the metrics it reports, and (main term) the entropy."""

    values: torch.Tensor
    metrics: Metrics
    entropy: torch.Tensor | None = None


@dataclass(frozen=True)
class Term:
    """One additive term of the loss."""

    name: str
    coefficient: str | None  # the `OPDConfig` field holding its weight; None: weight 1 (the main divergence)
    over: str  # "positions" (normalised by N̂) or "gold_tokens" (normalised by M̂)
    reference: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]  # its formula in `losses`
    fast: Callable[[LossBatch, Objective], TermValue]  # its hidden-state path in `chunked`
    metrics: tuple[str, ...] = ()  # the `opd/` metrics it reports


TermFunction = Callable[[LossBatch, "Objective"], TermValue]


def _stand_in_when_empty(count: Callable[[LossBatch], int]) -> Callable[[TermFunction], TermFunction]:
    """`term` on a batch, or, when `count(batch)` items are 0, on `batch.placeholder()` weighted 0 (an empty value
    still tied to the graph, no metrics): the kernels, and their collective head gathers under ZeRO-3, run alike on
    every rank."""

    def decorate(term: TermFunction) -> TermFunction:
        def evaluate(batch: LossBatch, objective: Objective) -> TermValue:
            if count(batch) > 0:
                return term(batch, objective)
            stand_in = term(batch.placeholder(), objective)
            empty = stand_in.values[:0] + 0.0 * stand_in.values.sum()
            entropy = None if stand_in.entropy is None else stand_in.entropy[:0].detach()
            return TermValue(empty, {}, entropy)

        return evaluate

    return decorate


def _positions(batch: LossBatch) -> int:
    return batch.token_ids.numel()


def _gold_tokens(batch: LossBatch) -> int:
    return batch.gold_ids.numel()


def _per_teacher(term: TermFunction) -> TermFunction:
    """`term` (which reads one teacher) evaluated on each teacher's positions and put back in position order; the
    metrics' sums and counts add up over teachers."""

    def routed(batch: LossBatch, objective: Objective) -> TermValue:
        if not isinstance(batch.teacher, RoutedAnswer):
            return term(batch, objective)
        n = batch.token_ids.shape[0]
        values = entropy = None
        metrics: Metrics = {}
        for _, index, part in batch.by_teacher():
            value = term(part, objective)
            values = (value.values.new_zeros(n) if values is None else values).index_copy(0, index, value.values)
            if value.entropy is not None:
                entropy = (value.entropy.new_zeros(n) if entropy is None else entropy).index_copy(
                    0, index, value.entropy
                )
            for name, (total, count) in value.metrics.items():
                previous, seen = metrics.get(name, (0.0, 0))
                metrics[name] = (previous + total, seen + count)
        return TermValue(values, metrics, entropy)

    return routed


@_per_teacher
@_stand_in_when_empty(_positions)
def _divergence(batch: LossBatch, objective: Objective) -> TermValue:
    student, teacher = batch.student, batch.teacher
    if isinstance(teacher, TeacherTopK):
        values, entropy = chunked.divergence_from_teacher_topk(
            student.hidden,
            student.head,
            teacher.ids,
            teacher.log_probs,
            teacher.token_log_probs,
            objective.divergence,
            batch.token_ids,
        )
        return TermValue(values, {}, entropy)
    values, entropy = chunked.divergence_from_hidden(
        student.hidden, teacher.hidden, student.head, teacher.head, objective.divergence, batch.token_ids
    )
    return TermValue(values, {}, entropy)


@_stand_in_when_empty(_positions)
def _reference_kl(batch: LossBatch, objective: Objective) -> TermValue:
    student, reference = batch.student, batch.reference
    kl = chunked.reference_kl(student.hidden, reference.hidden, student.head, reference.head)
    return TermValue(kl, {"opd/ref_kl": (kl.detach().sum(), kl.numel())})


@_per_teacher
@_stand_in_when_empty(_positions)
def _entropy_gated_forward_kl(batch: LossBatch, objective: Objective) -> TermValue:
    student, teacher = batch.student, batch.teacher
    term, gate = chunked.entropy_gated_forward_kl(
        student.hidden,
        teacher.hidden,
        student.head,
        teacher.head,
        objective.divergence.loss_top_k,
        objective.eopd_entropy_threshold,
    )
    return TermValue(term, {"opd/eopd_gate_share": (gate.sum(), gate.numel())})


@_stand_in_when_empty(_gold_tokens)
def _gold_sft(batch: LossBatch, objective: Objective) -> TermValue:
    nll = chunked.gold_nll(batch.gold.hidden, batch.gold.head, batch.gold_ids)
    return TermValue(nll, {"opd/gold_nll": (nll.detach().sum(), nll.numel())})


TERMS = (
    Term("divergence", None, "positions", losses.divergence_of_logits, _divergence),
    Term("ref_kl", "ref_kl_coef", "positions", losses.reference_kl, _reference_kl, ("ref_kl",)),
    Term(
        "eopd",
        "eopd_coef",
        "positions",
        losses.entropy_gated_forward_kl,
        _entropy_gated_forward_kl,
        ("eopd_gate_share",),
    ),
    Term("gold_sft", "gold_sft_weight", "gold_tokens", losses.gold_nll, _gold_sft, ("gold_nll",)),
)


class ObjectiveValue(NamedTuple):
    """The objective on a batch, before normalisation."""

    per_position: torch.Tensor  # (N,) Σ of coefficient × value of the per-position terms
    per_gold_token: torch.Tensor | None  # (M,) the same for the gold-SFT term, None when it is off
    entropy: torch.Tensor  # (N,) the student's entropy at the loss positions (detached)
    metrics: Metrics


@dataclass(frozen=True)
class Objective:
    """The loss of one training step: a divergence and the active terms with their coefficients."""

    divergence: Divergence
    terms: tuple[tuple[Term, float], ...]
    eopd_entropy_threshold: float

    @classmethod
    def from_args(cls, args: OPDConfig) -> Objective:
        """The objective `args` describes now (read at every step: callbacks may have changed a knob)."""
        divergence = Divergence(
            kl_direction=args.kl_direction,
            forward_kl_weight=args.forward_kl_weight,
            beta=args.beta,
            loss_support=args.loss_support,
            loss_top_k=args.loss_top_k,
            loss_add_tail=args.loss_add_tail,
        )
        weights = {term: 1.0 if term.coefficient is None else getattr(args, term.coefficient) for term in TERMS}
        terms = tuple((term, weight) for term, weight in weights.items() if weight > 0)
        return cls(divergence, terms, args.eopd_entropy_threshold)

    def uses(self, name: str) -> bool:
        """Whether the term called `name` is active."""
        return any(term.name == name for term, _ in self.terms)

    @property
    def metric_names(self) -> list[str]:
        """The `opd/` metrics the active terms report: a function of the config, identical on every rank."""
        return [f"opd/{metric}" for term, _ in self.terms for metric in term.metrics]

    def evaluate(self, batch: LossBatch) -> ObjectiveValue:
        """Every active term on `batch`, inside one gather of all the output heads they read (ZeRO-3)."""
        per_position, per_gold_token, entropy, metrics = None, None, None, {}
        with maybe_gather_lm_head_ctx(*batch.head_parameters()):
            for term, weight in self.terms:
                value = term.fast(batch, self)
                metrics.update(value.metrics)
                entropy = value.entropy if value.entropy is not None else entropy
                weighted = value.values if weight == 1.0 else weight * value.values
                if term.over == "positions":
                    per_position = weighted if per_position is None else per_position + weighted
                else:
                    per_gold_token = weighted
        return ObjectiveValue(per_position, per_gold_token, entropy.detach(), metrics)
