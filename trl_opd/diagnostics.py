"""What OPD failing looks like while it happens (docs/concepts.md): overlap, entropies, log-ratios, repetition.

Pure functions of completions or of a sample of positions' logits; the trainer logs them under `opd/` every logging
step. Sources: overlap ratio/mass and entropy gap (Li et al., arXiv 2604.13016); truncation and repetition rates and
the log-ratio on repeated tokens (Luo et al., arXiv 2604.08527).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

PAPER_TAIL_CHARS = 10_000  # Luo et al.: last 10,000 characters ...
PAPER_THRESHOLD = 10.0  # ... flagged when |bytes| / |zlib(bytes)| > 10
MIN_THRESHOLD = 3.0  # ordinary prose compresses ~2-3x at any length
TOKEN_DIAGNOSTICS = (
    "overlap_ratio",
    "overlap_mass_student",
    "overlap_mass_teacher",
    "student_entropy",
    "teacher_entropy",
    "entropy_gap",
    "log_ratio_mean",
    "log_ratio_std",
    "log_ratio_positive_share",
)
# what `token_diagnostics` returns when given the repeated-n-gram mask: the above and the log-ratio split by it
TOKEN_DIAGNOSTICS_LOGGED = (*TOKEN_DIAGNOSTICS, "log_ratio_repeated", "log_ratio_non_repeated")
GRADIENT_COHERENCE = "gradient_coherence"


def compression_ratio(text: str) -> float:
    """|bytes| / |zlib(bytes)| of `text` (UTF-8); 0 for empty text. Repetitive text compresses far better."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data, 9)) if data else 0.0


def repetition_threshold(tail_chars: int) -> float:
    """Compression-ratio threshold for a tail of `tail_chars` characters, scaled from Luo et al.'s (10,000 chars, 10).

    A text repeating a period of p characters compresses about tail_chars / p times, so the paper's threshold is
    scaled linearly with the tail length, floored at 3 (what non-repetitive text never reaches).
    """
    return max(MIN_THRESHOLD, PAPER_THRESHOLD * tail_chars / PAPER_TAIL_CHARS)


def repetition_rate(texts: Sequence[str], tail_chars: int, threshold: float) -> float:
    """RepRate: share of completions whose last `tail_chars` characters compress more than `threshold` times."""
    if not texts:
        return 0.0
    return sum(compression_ratio(text[-tail_chars:]) > threshold for text in texts) / len(texts)


def truncation_rate(
    completion_ids: Sequence[Sequence[int]], eos_token_ids: Sequence[int], max_length: int | None
) -> float:
    """TruncRate: share of completions that reached `max_length` tokens without an EOS (with `max_length` None, that
    ended without an EOS: the generation's own length limit cut them)."""
    if not completion_ids:
        return 0.0
    eos = set(eos_token_ids)
    cut = [(max_length is None or len(ids) >= max_length) and not eos.intersection(ids) for ids in completion_ids]
    return sum(cut) / len(completion_ids)


def repeated_token_mask(token_ids: torch.Tensor, n: int = 4) -> torch.Tensor:
    """For each row of (B, T) ids, True where the n-gram ending at that token already occurred earlier in the row."""
    repeated = torch.zeros_like(token_ids, dtype=torch.bool)
    for row, ids in enumerate(token_ids.tolist()):
        seen: set[tuple[int, ...]] = set()
        for t in range(n - 1, len(ids)):
            gram = tuple(ids[t - n + 1 : t + 1])
            repeated[row, t] = gram in seen
            seen.add(gram)
    return repeated


def head_gradient_coherence(logit_grads: torch.Tensor, hidden: torch.Tensor) -> float:
    """‖Σ_t G_t‖ / Σ_t ‖G_t‖ for the per-position gradients G_t = g_t h_tᵀ of the loss w.r.t. the `lm_head` weight.

    g_t (n, V) is ∂loss_t/∂logits_t and h_t (n, H) the hidden state at position t. 1 means every position pushes the
    head the same way; near 1/√n, unrelated directions; lower, positions cancelling out (a sign of a noisy or
    self-contradicting signal). Exact and cheap through Gram matrices: ‖Σ_t G_t‖² = Σ_{t,s} (g_t·g_s)(h_t·h_s) and
    ‖G_t‖ = ‖g_t‖·‖h_t‖, so no (V, H) matrix is formed.
    """
    g, h = logit_grads.double(), hidden.double()
    summed = ((g @ g.T) * (h @ h.T)).sum().clamp_min(0).sqrt()
    separate = (g.norm(dim=-1) * h.norm(dim=-1)).sum()
    return float(summed / separate) if separate > 0 else 0.0


def _entropy(log_probs: torch.Tensor) -> torch.Tensor:
    return -(log_probs.exp() * log_probs).sum(-1)


@torch.no_grad()
def token_diagnostics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    token_ids: torch.Tensor,
    k: int,
    repeated: torch.Tensor | None = None,
) -> dict[str, float]:
    """Per-position agreement statistics over (N, V) logits at the sampled tokens `token_ids` (N,), averaged.

    - overlap_ratio = |S^q ∩ S^p| / k for the top-k sets S^q (student) and S^p (teacher);
    - overlap_mass_student = Σ_{v∈S^q∩S^p} q(v), overlap_mass_teacher = Σ_{v∈S^q∩S^p} p(v);
    - student/teacher entropy and entropy_gap = |H(p_T) − H(q_θ)|;
    - log-ratio r = log q_θ(y) − log p_T(y) at the sampled token: mean, std, share > 0, and its mean on tokens
      ending a repeated n-gram vs the others (`repeated`, when given).
    """
    if student_logits.shape[0] == 0:
        return {}
    k = min(k, student_logits.shape[-1])
    log_q = torch.log_softmax(student_logits.float(), -1)
    log_p = torch.log_softmax(teacher_logits.float(), -1)
    top_q, top_p = log_q.topk(k, -1).indices, log_p.topk(k, -1).indices
    shared = (top_q.unsqueeze(-1) == top_p.unsqueeze(-2)).any(-1)  # (N, k): student top-k ids also in the teacher's
    shared_mass_q = (log_q.gather(-1, top_q).exp() * shared).sum(-1)
    shared_mass_p = (log_p.gather(-1, top_q).exp() * shared).sum(-1)
    student_entropy, teacher_entropy = _entropy(log_q), _entropy(log_p)
    ratio = (log_q - log_p).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    stats = {
        "overlap_ratio": shared.float().mean(-1).mean().item(),
        "overlap_mass_student": shared_mass_q.mean().item(),
        "overlap_mass_teacher": shared_mass_p.mean().item(),
        "student_entropy": student_entropy.mean().item(),
        "teacher_entropy": teacher_entropy.mean().item(),
        "entropy_gap": (teacher_entropy - student_entropy).abs().mean().item(),
        "log_ratio_mean": ratio.mean().item(),
        "log_ratio_std": ratio.std(unbiased=False).item(),
        "log_ratio_positive_share": (ratio > 0).float().mean().item(),
    }
    if repeated is not None:
        for name, selected in (("repeated", repeated), ("non_repeated", ~repeated)):
            if selected.any():
                stats[f"log_ratio_{name}"] = ratio[selected].mean().item()
    return stats
