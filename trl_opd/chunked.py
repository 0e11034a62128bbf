"""Divergences computed from hidden states and `lm_head` weights, without (N, V) logits held for backward.

The trainer's memory-lean paths. Each function takes the student's and teacher's last hidden states at the N
loss positions and their output heads, and returns the per-position divergence (N,) and the student's entropy
(N,); each agrees with `losses.per_token_divergence` on explicitly projected logits (tests check 1e-5 in fp32).

- "full": TRL's `ChunkedDivergenceFunction` (tiles of the projection, never the whole (N, V) logits); "mixed" runs
  it once per direction.
- top-k supports: a no-grad pass over token chunks projects both heads chunk by chunk to find the support, the
  teacher's logits on it and, with a tail, its outside mass and the student's entropy; then the student's logits
  are recomputed with gradient on the support only (under activation checkpointing): each position gathers its
  own k head rows, k·H work per position instead of V·H. Only the student's tail needs a gradient through its
  full normaliser: that chunk is projected over the whole vocabulary inside the checkpoint, so backward
  recomputes it instead of storing it.
- "sampled_token": TRL's `ChunkedLogProbFunction` for log q_θ(y) (with gradient) and log p_T(y) (without).
- a teacher known only by its top-k (served or cached): `divergence_from_teacher_topk`, the same student side.

Materialised at once: (N, k) or (N, 2k) support tensors, and one (C, V) or (C, k, H) tile per token chunk of C
positions (≈ 2^24 floats), never (N, V).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
from trl.kernels.chunked_logprob import ChunkedLogProbFunction
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .heads import OutputHead
from .losses import (
    Divergence,
    outside_log_mass,
    sampled_token_divergence,
    support_log_probs,
    token_divergence,
    topk_support,
)

LOGPROB_VOCAB_CHUNK = 32768  # vocabulary tile of TRL's chunked log-prob kernel (TRL's own default)
TILE_ELEMENTS = 2**24  # a (C, V) fp32 tile of 64 MiB


def full_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: OutputHead,
    teacher_head: OutputHead,
    divergence: Divergence,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-vocabulary divergence via TRL's chunked kernel; (divergence (N,), student entropy (N,)).

    The kernel takes one temperature; the teacher's own temperature T_t is folded into its logit scale and
    softcap (both × T_s/T_t), which is exact: c·r·tanh(s·r·z/(c·r))/T_s = c·tanh(s·z/c)/T_t.
    """
    ratio = student_head.temperature / teacher_head.temperature
    teacher_softcap = None if teacher_head.softcap is None else teacher_head.softcap * ratio

    def kernel(kernel_beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        return ChunkedDivergenceFunction.apply(
            student_hidden,
            student_head.weight,
            student_head.bias,
            teacher_hidden,
            teacher_head.weight,
            teacher_head.bias,
            kernel_beta,
            student_head.temperature,
            student_head.logit_scale,
            student_head.softcap,
            teacher_head.logit_scale * ratio,
            teacher_softcap,
        )

    if divergence.kl_direction == "mixed":
        forward, entropy = kernel(0.0)
        reverse, _ = kernel(1.0)
        return divergence.forward_kl_weight * forward + (1 - divergence.forward_kl_weight) * reverse, entropy
    return kernel({"forward": 0.0, "reverse": 1.0}.get(divergence.kl_direction, divergence.beta))


def _token_chunk(elements_per_position: int) -> int:
    return max(1, TILE_ELEMENTS // elements_per_position)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


class SupportPass(NamedTuple):
    """What the no-grad pass over both heads yields for a top-k support, per position."""

    index: torch.Tensor  # (N, K) vocabulary ids of the support
    valid: torch.Tensor  # (N, K) which slots are real (union duplicates are not)
    teacher_support: torch.Tensor  # (N, K) teacher logits on the support
    teacher_outside: torch.Tensor | None  # (N,) log of the teacher's unnormalised mass outside, with a tail
    student_entropy: torch.Tensor  # (N,)
    teacher_entropy: torch.Tensor  # (N,)


@torch.no_grad()
def _select_support(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: OutputHead,
    teacher_head: OutputHead,
    loss_support: str,
    k: int,
    add_tail: bool,
) -> SupportPass:
    """No-grad pass, chunk by chunk: the support and what the loss needs from the teacher on it, and entropies."""
    chunk = _token_chunk(teacher_head.weight.shape[0])
    parts = []
    for start in range(0, student_hidden.shape[0], chunk):
        s_logits = student_head.logits(student_hidden[start : start + chunk])
        t_logits = teacher_head.logits(teacher_hidden[start : start + chunk])
        index, valid = topk_support(s_logits, t_logits, loss_support, k)
        t_outside = outside_log_mass(t_logits, index) if add_tail else None
        parts.append(
            SupportPass(index, valid, t_logits.gather(-1, index), t_outside, _entropy(s_logits), _entropy(t_logits))
        )
    return SupportPass(*(None if values[0] is None else torch.cat(values) for values in zip(*parts)))


def _student_support_logits(
    hidden: torch.Tensor, index: torch.Tensor, head: OutputHead, add_tail: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student logits on the support (with gradient) and, for the tail, its outside mass (else an empty tensor)."""
    if add_tail:
        logits = head.logits(hidden)
        return logits.gather(-1, index), outside_log_mass(logits, index)
    return head.logits_at(hidden, index), hidden.new_empty(0)


def topk_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: OutputHead,
    teacher_head: OutputHead,
    divergence: Divergence,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k-support divergence (docs/concepts.md) from hidden states; (divergence (N,), student entropy (N,))."""
    add_tail = divergence.loss_add_tail
    support = _select_support(
        student_hidden,
        teacher_hidden,
        student_head,
        teacher_head,
        divergence.loss_support,
        divergence.loss_top_k,
        add_tail,
    )
    student_support, student_outside = _student_support(student_hidden, student_head, support.index, add_tail)
    value = token_divergence(
        support_log_probs(student_support, support.valid, student_outside),
        support_log_probs(support.teacher_support, support.valid, support.teacher_outside),
        divergence,
    )
    return value, support.student_entropy


def _student_support(
    student_hidden: torch.Tensor, student_head: OutputHead, index: torch.Tensor, loss_add_tail: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Student logits on the support with gradient, chunk by chunk under checkpointing (and its outside mass)."""
    width = student_head.weight.shape[0] if loss_add_tail else index.shape[-1] * student_head.weight.shape[1]
    chunk = _token_chunk(width)
    supports, outsides = [], []
    for start in range(0, student_hidden.shape[0], chunk):
        sl = slice(start, start + chunk)
        support, outside = checkpoint(
            _student_support_logits, student_hidden[sl], index[sl], student_head, loss_add_tail, use_reentrant=False
        )
        supports.append(support)
        outsides.append(outside)
    return torch.cat(supports), torch.cat(outsides) if loss_add_tail else None


def _no_positions(student_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch without loss positions: an empty (0,) value still tied to the graph, and an empty (0,) second
    output (entropy or gate)."""
    empty = student_hidden.sum(-1) * 0.0
    return empty, empty.detach()


def entropy_gated_forward_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: OutputHead,
    teacher_head: OutputHead,
    k: int,
    threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`losses.entropy_gated_forward_kl` from hidden states: 1[H(p_T) > τ] · KL(p̄_T‖q̄_θ) on the teacher's top-k
    support, renormalised (EOPD, Jin et al., arXiv 2603.07079). Returns (term (N,), gate (N,) as 0/1 floats)."""
    if student_hidden.shape[0] == 0:
        return _no_positions(student_hidden)
    support = _select_support(student_hidden, teacher_hidden, student_head, teacher_head, "teacher_topk", k, False)
    student_support, _ = _student_support(student_hidden, student_head, support.index, False)
    forward = token_divergence(
        support_log_probs(student_support, support.valid),
        support_log_probs(support.teacher_support, support.valid),
        Divergence("forward", loss_support="teacher_topk", loss_top_k=k),
    )
    gate = (support.teacher_entropy > threshold).to(forward.dtype)
    return gate * forward, gate


def sampled_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: OutputHead,
    teacher_head: OutputHead,
    token_ids: torch.Tensor,
    kl_direction: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled-token estimator (docs/concepts.md) via TRL's chunked log-prob kernel; (value (N,), entropy (N,))."""
    student_lp, entropy = token_log_probs(student_hidden, student_head, token_ids, with_entropy=True)
    with torch.no_grad():
        teacher_lp = token_log_probs(teacher_hidden, teacher_head, token_ids)
    return sampled_token_divergence(student_lp, teacher_lp, kl_direction), entropy.detach()


def token_log_probs(hidden: torch.Tensor, head: OutputHead, token_ids: torch.Tensor, with_entropy: bool = False):
    """log softmax(head(hidden))[token_ids] (N,) via TRL's chunked log-prob kernel; with the entropy (N,) if asked."""
    with maybe_gather_lm_head_ctx(head.weight, head.bias):
        log_probs, entropy, *_ = ChunkedLogProbFunction.apply(
            hidden,
            head.weight,
            head.bias,
            token_ids,
            head.temperature,
            LOGPROB_VOCAB_CHUNK,
            head.softcap,
            head.logit_scale,
            ("entropy",) if with_entropy else (),
        )
    return (log_probs, entropy) if with_entropy else log_probs


def reference_kl(
    student_hidden: torch.Tensor, reference_hidden: torch.Tensor, student_head: OutputHead, reference_head: OutputHead
) -> torch.Tensor:
    """`losses.reference_kl` from hidden states, KL(q_θ‖q_ref) per position (N,), with TRL's chunked kernel."""
    kl, _ = full_divergence(student_hidden, reference_hidden, student_head, reference_head, Divergence("reverse"))
    return kl


def gold_nll(hidden: torch.Tensor, head: OutputHead, gold_ids: torch.Tensor) -> torch.Tensor:
    """`losses.gold_nll` from hidden states, −log q_θ(y) per gold token (M,), with TRL's chunked log-prob kernel."""
    return -token_log_probs(hidden, head, gold_ids)


TEACHER_TOPK_SUPPORTS = ("teacher_topk", "sampled_token")  # what a teacher known only by its top-k allows


def divergence_from_teacher_topk(
    student_hidden: torch.Tensor,
    student_head: OutputHead,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    teacher_token_log_probs: torch.Tensor,
    divergence: Divergence,
    token_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The divergence against a teacher known only by its top-k (served or cached); (divergence (N,), entropy (N,)).

    `teacher_ids`/`teacher_log_probs` (N, k) are its top-k tokens and their log-probabilities under its full
    softmax (−inf padding), `teacher_token_log_probs` (N,) its log-probability of each prefix token. This equals
    `divergence_from_hidden` with the same teacher held locally: on the teacher's top-k support, log_softmax of the
    log-probabilities is log_softmax of the logits (a constant shift), and the tail bucket's teacher mass
    log(1 − Σ_S p_T) is what the local path computes from the logits outside S. The sampled-token estimator needs
    only log p_T(y).
    """
    if divergence.loss_support not in TEACHER_TOPK_SUPPORTS:
        raise ValueError(
            f"A teacher known only by its top-k (served or cached) supports `loss_support` in "
            f"{list(TEACHER_TOPK_SUPPORTS)}, not {divergence.loss_support!r}."
        )
    if student_hidden.shape[0] == 0:
        return _no_positions(student_hidden)
    with maybe_gather_lm_head_ctx(student_head.weight, student_head.bias):
        if divergence.loss_support == "sampled_token":
            student_lp, entropy = token_log_probs(student_hidden, student_head, token_ids, with_entropy=True)
            value = sampled_token_divergence(
                student_lp, teacher_token_log_probs.to(student_lp.dtype), divergence.kl_direction
            )
            return value, entropy.detach()
        if teacher_ids.shape[-1] < divergence.loss_top_k:
            raise ValueError(
                f"`loss_top_k={divergence.loss_top_k}` but the teacher gave only {teacher_ids.shape[-1]} entries per "
                "position: lower `loss_top_k`, or rebuild the cache with a larger `top_k`."
            )
        index = teacher_ids[:, : divergence.loss_top_k]
        teacher_lp = teacher_log_probs[:, : divergence.loss_top_k].float()
        valid = teacher_lp > float("-inf")
        teacher_outside = None
        if divergence.loss_add_tail:  # log(1 − Σ_S p_T), from the log of the support's mass
            inside = torch.logsumexp(teacher_lp, dim=-1).clamp(max=0.0)
            teacher_outside = torch.log(-torch.expm1(inside))
        student_support, student_outside = _student_support(
            student_hidden, student_head, index, divergence.loss_add_tail
        )
        with torch.no_grad():
            _, entropy = token_log_probs(student_hidden, student_head, token_ids, with_entropy=True)
        value = token_divergence(
            support_log_probs(student_support, valid, student_outside),
            support_log_probs(teacher_lp, valid, teacher_outside),
            divergence,
        )
        return value, entropy


def divergence_from_hidden(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: OutputHead,
    teacher_head: OutputHead,
    divergence: Divergence,
    token_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on `divergence.loss_support`: per-position divergence (N,) and student entropy (N,), both in nats.

    `student_hidden`/`teacher_hidden` are (N, H_s)/(N, H_t) at the loss positions; `token_ids` (N,) are the
    prefix tokens at those positions (needed by "sampled_token").
    """
    if student_hidden.shape[0] == 0:
        return _no_positions(student_hidden)
    with maybe_gather_lm_head_ctx(student_head.weight, student_head.bias, teacher_head.weight, teacher_head.bias):
        if divergence.loss_support == "full":
            return full_divergence(student_hidden, teacher_hidden, student_head, teacher_head, divergence)
        if divergence.loss_support == "sampled_token":
            return sampled_divergence(
                student_hidden, teacher_hidden, student_head, teacher_head, token_ids, divergence.kl_direction
            )
        return topk_divergence(student_hidden, teacher_hidden, student_head, teacher_head, divergence)
