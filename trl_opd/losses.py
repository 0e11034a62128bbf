"""Token-level divergences between a student q_θ and a teacher p_T, and the supports they are evaluated on.

Pure tensor functions, no trainer state; each docstring states its formula and source (see docs/concepts.md). Every
function works in log space and is exact for −inf logits (suppressed tokens): 0·log 0 = 0, and a token the
teacher allows but the student forbids makes the forward KL +inf rather than NaN. Gradients never see NaN from
masked entries (`torch.where` is always applied to the inputs of a product, not only to its output).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import KL_DIRECTIONS, LOSS_SUPPORTS, TOPK_SUPPORTS

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Divergence:
    """Which token-level divergence is matched, and where: the settings every divergence function takes as one value.

    - `kl_direction`: "forward" KL(p_T‖q_θ), "reverse" KL(q_θ‖p_T), "jsd" (`generalized_jsd` with `beta`) or "mixed"
      (`forward_kl_weight`·forward + (1 − `forward_kl_weight`)·reverse);
    - `loss_support`: "full", a top-k set ("teacher_topk", "student_topk", "union_topk", `loss_top_k` ids, with a
      tail bucket when `loss_add_tail`) or "sampled_token".

    The defaults are those of the public `per_token_divergence`; the trainer always builds this from its `OPDConfig`,
    whose `beta` default is TRL's (1.0). Invalid combinations raise `ValueError` naming the valid ones.
    """

    kl_direction: str = "reverse"
    forward_kl_weight: float = 0.5
    beta: float = 0.5
    loss_support: str = "full"
    loss_top_k: int = 32
    loss_add_tail: bool = False

    def __post_init__(self) -> None:
        if self.kl_direction not in KL_DIRECTIONS:
            raise ValueError(f"`kl_direction` must be one of {list(KL_DIRECTIONS)}, got {self.kl_direction!r}.")
        if self.loss_support not in LOSS_SUPPORTS:
            raise ValueError(f"`loss_support` must be one of {list(LOSS_SUPPORTS)}, got {self.loss_support!r}.")
        if self.loss_add_tail and self.loss_support not in TOPK_SUPPORTS:
            raise ValueError(
                f"`loss_add_tail=True` needs a top-k support ({list(TOPK_SUPPORTS)}), got {self.loss_support!r}."
            )


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_v p(v)(log p(v) − log q(v)) over the last dimension, from log-probabilities.

    Entries with p(v) = 0 contribute 0 (and no gradient); p(v) > 0 with q(v) = 0 gives +inf. The result is clamped
    at 0: KL ≥ 0 holds exactly, and floating-point rounding of near-equal distributions must not break it.
    """
    has_mass = log_p > NEG_INF
    safe_log_p = torch.where(has_mass, log_p, torch.zeros_like(log_p))
    safe_log_q = torch.where(has_mass, log_q, torch.zeros_like(log_q))
    terms = torch.exp(safe_log_p) * (safe_log_p - safe_log_q)
    return torch.where(has_mass, terms, torch.zeros_like(terms)).sum(-1).clamp_min(0.0)


def generalized_jsd(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD of GKD (Agarwal et al. 2024) in TRL's convention, docs/concepts.md.

    JSD_β = β·KL(p_T‖m) + (1−β)·KL(q_θ‖m), m = β·p_T + (1−β)·q_θ; β = 0 is the forward KL(p_T‖q_θ) and β = 1 the
    reverse KL(q_θ‖p_T) (their limits after dividing by β resp. 1−β, as TRL defines them).
    """
    if beta == 0.0:
        return kl_divergence(teacher_log_probs, student_log_probs)
    if beta == 1.0:
        return kl_divergence(student_log_probs, teacher_log_probs)
    # logaddexp(−inf, −inf) has a NaN derivative: give it finite inputs where both distributions are zero
    neither = (student_log_probs == NEG_INF) & (teacher_log_probs == NEG_INF)
    safe_student = student_log_probs.masked_fill(neither, 0.0)
    safe_teacher = teacher_log_probs.masked_fill(neither, 0.0)
    log_m = torch.logaddexp(safe_student + math.log1p(-beta), safe_teacher + math.log(beta)).masked_fill(
        neither, NEG_INF
    )
    return beta * kl_divergence(teacher_log_probs, log_m) + (1 - beta) * kl_divergence(student_log_probs, log_m)


def token_divergence(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, divergence: Divergence
) -> torch.Tensor:
    """The per-position divergence chosen by `divergence.kl_direction` (docs/concepts.md), over the last dimension.

    - "forward": KL(p_T‖q_θ); gradient −E_{v∼p_T}∇log q_θ(v) (cross-entropy to soft targets);
    - "reverse": KL(q_θ‖p_T); gradient E_{v∼q_θ}[(log q_θ − log p_T)(v)∇log q_θ(v)];
    - "jsd": `generalized_jsd` with `beta`;
    - "mixed": w·KL(p_T‖q_θ) + (1−w)·KL(q_θ‖p_T), w = `forward_kl_weight` (arXiv 2605.16826).
    """
    if divergence.kl_direction == "forward":
        return kl_divergence(teacher_log_probs, student_log_probs)
    if divergence.kl_direction == "reverse":
        return kl_divergence(student_log_probs, teacher_log_probs)
    if divergence.kl_direction == "jsd":
        return generalized_jsd(student_log_probs, teacher_log_probs, divergence.beta)
    forward = kl_divergence(teacher_log_probs, student_log_probs)
    reverse = kl_divergence(student_log_probs, teacher_log_probs)
    return divergence.forward_kl_weight * forward + (1 - divergence.forward_kl_weight) * reverse


def topk_support(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss_support: str, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vocabulary ids of the support S_t per position, and which of them are real (docs/concepts.md).

    - "teacher_topk": top-k of the teacher (Fu et al., arXiv 2603.25562);
    - "student_topk": top-k of the student (Li et al., arXiv 2604.13016), selected without gradient;
    - "union_topk": both, as 2k slots; a student slot already among the teacher's is marked not valid.

    Returns `(index, valid)` of shape (..., k) or (..., 2k); `valid` is boolean.
    """
    vocab_size = teacher_logits.size(-1)
    if not 1 <= k <= vocab_size:
        raise ValueError(f"`loss_top_k` must be in [1, vocab size = {vocab_size}], got {k}. Lower `loss_top_k`.")
    if loss_support == "teacher_topk":
        index = teacher_logits.detach().topk(k, dim=-1).indices
        return index, torch.ones_like(index, dtype=torch.bool)
    if loss_support == "student_topk":
        index = student_logits.detach().topk(k, dim=-1).indices
        return index, torch.ones_like(index, dtype=torch.bool)
    if loss_support == "union_topk":
        teacher_index = teacher_logits.detach().topk(k, dim=-1).indices
        student_index = student_logits.detach().topk(k, dim=-1).indices
        duplicate = (student_index.unsqueeze(-1) == teacher_index.unsqueeze(-2)).any(-1)
        index = torch.cat([teacher_index, student_index], dim=-1)
        valid = torch.cat([torch.ones_like(teacher_index, dtype=torch.bool), ~duplicate], dim=-1)
        return index, valid
    raise ValueError(f"`loss_support` must be one of {list(TOPK_SUPPORTS)} here, got {loss_support!r}.")


def outside_log_mass(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log Σ_{v∉S} exp(z_v): the log of the unnormalised mass outside the support `index`, over the last dim."""
    inside = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, index, True)
    return torch.logsumexp(logits.masked_fill(inside, NEG_INF), dim=-1)


def support_log_probs(
    support_logits: torch.Tensor, valid: torch.Tensor, log_outside: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-probabilities of one distribution on a support, renormalised or with a tail bucket (docs/concepts.md).

    Without `log_outside`: p̄(v) = p(v)/Σ_{u∈S} p(u), i.e. `log_softmax` over the gathered logits (invalid slots get
    −inf, i.e. probability 0). With `log_outside` = log Σ_{v∉S} exp(z_v) (see `outside_log_mass`): one more element,
    the tail bucket log(1 − Σ_{v∈S} p(v)) (TRL server distillation; verl#7856), computed from the outside logits
    rather than as 1 − Σ so it stays exact when the support holds nearly all the mass. Both variants are proper
    distributions, so any KL between two of them is ≥ 0.
    """
    masked = support_logits.masked_fill(~valid, NEG_INF)
    if log_outside is None:
        return torch.log_softmax(masked, dim=-1)
    with_tail = torch.cat([masked, log_outside.unsqueeze(-1)], dim=-1)
    return torch.log_softmax(with_tail, dim=-1)


def sampled_token_divergence(
    student_token_log_probs: torch.Tensor, teacher_token_log_probs: torch.Tensor, kl_direction: str = "reverse"
) -> torch.Tensor:
    """Single-sample estimators of the token KL at the sampled token y (docs/concepts.md, Thinking Machines 2025).

    - "reverse" (y ∼ q_θ): value log q_θ(y) − log p_T(y), gradient A·∇log q_θ(y) with A = (log q_θ − log p_T)(y)
      held constant; this is the surrogate −A_t·log q_θ(y_t) of the advantage A_t = log p_T − log q_θ, whose
      expectation over y ∼ q_θ is the exact reverse-KL gradient.
    - "forward" (y ∼ p_T, e.g. teacher/dataset tokens): value log p_T(y) − log q_θ(y), an unbiased estimate of
      KL(p_T‖q_θ), gradient −∇log q_θ(y), whose expectation over y ∼ p_T is the exact forward-KL gradient.
    """
    if kl_direction == "reverse":
        advantage = (student_token_log_probs - teacher_token_log_probs).detach()
        return advantage + advantage * (student_token_log_probs - student_token_log_probs.detach())
    if kl_direction == "forward":
        return teacher_token_log_probs.detach() - student_token_log_probs
    raise ValueError(
        f"`loss_support='sampled_token'` supports `kl_direction` 'reverse' or 'forward', got {kl_direction!r}."
    )


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"Student vocabulary ({student_logits.shape[-1]}) and teacher vocabulary ({teacher_logits.shape[-1]}) "
            "differ; token-level distillation needs a teacher that shares the student's tokenizer."
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} must "
            "cover the same positions."
        )


def per_token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kl_direction: str = Divergence.kl_direction,
    forward_kl_weight: float = Divergence.forward_kl_weight,
    beta: float = Divergence.beta,
    loss_support: str = Divergence.loss_support,
    loss_top_k: int = Divergence.loss_top_k,
    loss_add_tail: bool = Divergence.loss_add_tail,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    sampled_token_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position divergence in nats between student and teacher next-token distributions.

    Logits have shape (..., V); the result has shape (...). Student probabilities are softmax(z_s/`temperature`),
    teacher ones softmax(z_t/`teacher_temperature`) (default: `temperature`). The keyword arguments are the fields of
    `Divergence`; the support is:

    - "full": the whole vocabulary, `token_divergence` of `kl_direction` (docs/concepts.md);
    - "teacher_topk" / "student_topk" / "union_topk": S_t from `topk_support`, both distributions renormalised on
      it, or with a tail bucket when `loss_add_tail` (docs/concepts.md);
    - "sampled_token": `sampled_token_divergence` at `sampled_token_ids` (docs/concepts.md); only "reverse" (student
      samples) and "forward" (teacher samples) are meaningful.

    Invalid combinations raise `ValueError` naming the valid ones.
    """
    _check_logits(student_logits, teacher_logits)
    divergence = Divergence(kl_direction, forward_kl_weight, beta, loss_support, loss_top_k, loss_add_tail)
    teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    return divergence_of_logits(
        student_logits / temperature, teacher_logits / teacher_temperature, divergence, sampled_token_ids
    )


def divergence_of_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: Divergence,
    sampled_token_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`per_token_divergence` on logits that already include each side's temperature (see there)."""
    if divergence.loss_support == "full":
        return token_divergence(
            torch.log_softmax(student_logits, dim=-1), torch.log_softmax(teacher_logits, dim=-1), divergence
        )
    if divergence.loss_support == "sampled_token":
        if sampled_token_ids is None:
            raise ValueError("`loss_support='sampled_token'` needs `sampled_token_ids` (the tokens of the prefix).")
        index = sampled_token_ids.unsqueeze(-1)
        student_lp = torch.log_softmax(student_logits, dim=-1).gather(-1, index).squeeze(-1)
        teacher_lp = torch.log_softmax(teacher_logits, dim=-1).gather(-1, index).squeeze(-1)
        return sampled_token_divergence(student_lp, teacher_lp, divergence.kl_direction)

    index, valid = topk_support(student_logits, teacher_logits, divergence.loss_support, divergence.loss_top_k)
    student_outside = outside_log_mass(student_logits, index) if divergence.loss_add_tail else None
    teacher_outside = outside_log_mass(teacher_logits, index) if divergence.loss_add_tail else None
    return token_divergence(
        support_log_probs(student_logits.gather(-1, index), valid, student_outside),
        support_log_probs(teacher_logits.gather(-1, index), valid, teacher_outside),
        divergence,
    )


# ------------------------------------------------------------------------------ the objective's other terms


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ_v p(v) log p(v) over the last dimension, from log-probabilities (0·log 0 = 0)."""
    return -torch.where(log_probs > NEG_INF, log_probs.exp() * log_probs, torch.zeros_like(log_probs)).sum(-1)


def reference_kl(student_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Stable-OPD's anchor (Luo et al., arXiv 2604.08527): KL(q_θ‖q_ref) per position over the whole vocabulary,
    q_ref the initial student; logits include the student's temperature."""
    return kl_divergence(torch.log_softmax(student_logits, dim=-1), torch.log_softmax(reference_logits, dim=-1))


def entropy_gated_forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """EOPD's extra term (Jin et al., arXiv 2603.07079): 1[H(p_T) > τ] · KL(p̄_T‖q̄_θ), where p̄_T and q̄_θ are both
    distributions renormalised on the teacher's top-k ids and H(p_T) is the teacher's full-vocabulary entropy.

    Logits include each side's temperature. Returns (term, gate), the gate as 0/1 floats, both of shape (...).
    """
    forward = divergence_of_logits(
        student_logits, teacher_logits, Divergence("forward", loss_support="teacher_topk", loss_top_k=k)
    )
    gate = (entropy(torch.log_softmax(teacher_logits.float(), dim=-1)) > threshold).to(forward.dtype)
    return gate * forward, gate


def gold_nll(student_logits: torch.Tensor, gold_ids: torch.Tensor) -> torch.Tensor:
    """Stable-OPD's SFT term (Luo et al.): −log q_θ(y) per gold token y; logits include the student's temperature."""
    return -torch.log_softmax(student_logits, dim=-1).gather(-1, gold_ids.unsqueeze(-1)).squeeze(-1)
