"""`trl_opd.losses` against independent references: numpy sums, `torch.distributions`, autograd Jacobians."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from trl_opd.losses import per_token_divergence

DIRECTIONS = ("forward", "reverse", "jsd", "mixed")
TOPK = ("teacher_topk", "student_topk", "union_topk")


def logits_pair(shape=(3, 5, 11), scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale
    teacher = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale
    return student, teacher


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    """Σ p log(p/q) with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(-1)


def np_divergence(p_student, p_teacher, direction, weight=0.5, beta=0.5):
    if direction == "forward":
        return np_kl(p_teacher, p_student)
    if direction == "reverse":
        return np_kl(p_student, p_teacher)
    if direction == "mixed":
        return weight * np_kl(p_teacher, p_student) + (1 - weight) * np_kl(p_student, p_teacher)
    m = beta * p_teacher + (1 - beta) * p_student
    return beta * np_kl(p_teacher, m) + (1 - beta) * np_kl(p_student, m)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_full_kl_matches_torch_distributions(direction):
    student, teacher = logits_pair()
    q, p = Categorical(logits=student), Categorical(logits=teacher)
    expected = kl_divergence(p, q) if direction == "forward" else kl_divergence(q, p)
    got = per_token_divergence(student, teacher, kl_direction=direction)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "direction,beta,weight",
    [
        ("jsd", 0.1, 0.5),
        ("jsd", 0.5, 0.5),
        ("jsd", 0.9, 0.5),
        ("mixed", 0.5, 0.0),
        ("mixed", 0.5, 0.3),
        ("mixed", 0.5, 1.0),
    ],
)
def test_jsd_and_mixed_match_numpy(direction, beta, weight):
    student, teacher = logits_pair()
    expected = np_divergence(np_softmax(student.numpy()), np_softmax(teacher.numpy()), direction, weight, beta)
    got = per_token_divergence(student, teacher, kl_direction=direction, beta=beta, forward_kl_weight=weight)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_jsd_limits_are_trl_convention():
    student, teacher = logits_pair()
    forward = per_token_divergence(student, teacher, kl_direction="forward")
    reverse = per_token_divergence(student, teacher, kl_direction="reverse")
    torch.testing.assert_close(per_token_divergence(student, teacher, kl_direction="jsd", beta=0.0), forward)
    torch.testing.assert_close(per_token_divergence(student, teacher, kl_direction="jsd", beta=1.0), reverse)


def test_temperatures_scale_each_side():
    student, teacher = logits_pair()
    got = per_token_divergence(student, teacher, kl_direction="reverse", temperature=2.0, teacher_temperature=0.5)
    expected = kl_divergence(Categorical(logits=student / 2.0), Categorical(logits=teacher / 0.5))
    torch.testing.assert_close(got, expected)
    same = per_token_divergence(student, teacher, kl_direction="forward", temperature=2.0)
    torch.testing.assert_close(same, kl_divergence(Categorical(logits=teacher / 2), Categorical(logits=student / 2)))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_identical_distributions_give_zero(direction):
    student, _ = logits_pair()
    for support in ("full", *TOPK):
        got = per_token_divergence(
            student, student.clone(), kl_direction=direction, loss_support=support, loss_top_k=4
        )
        assert got.abs().max() < 1e-12, support


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_minus_inf_logits_are_exact_and_nan_free(direction):
    """A token suppressed (−inf) by both models is the same as a vocabulary without it; gradients stay finite."""
    student, teacher = logits_pair()
    student[..., 3] = float("-inf")
    teacher[..., 3] = float("-inf")
    student.requires_grad_(True)
    got = per_token_divergence(student, teacher, kl_direction=direction, beta=0.3, forward_kl_weight=0.7)
    keep = [i for i in range(student.shape[-1]) if i != 3]
    reduced = per_token_divergence(
        student.detach()[..., keep], teacher[..., keep], kl_direction=direction, beta=0.3, forward_kl_weight=0.7
    )
    torch.testing.assert_close(got.detach(), reduced)
    (grad,) = torch.autograd.grad(got.sum(), student)
    assert torch.isfinite(grad).all()
    assert (grad[..., 3] == 0).all()


def test_student_forbidding_a_teacher_token_makes_forward_kl_infinite_not_nan():
    student, teacher = logits_pair()
    student[..., 0] = float("-inf")
    forward = per_token_divergence(student, teacher, kl_direction="forward")
    reverse = per_token_divergence(student, teacher, kl_direction="reverse")
    assert torch.isinf(forward).all() and torch.isfinite(reverse).all()


def _jacobian_log_softmax(z):
    """J[v, j] = ∂ log q(v) / ∂ z_j, by autograd on log_softmax alone."""
    return torch.autograd.functional.jacobian(lambda x: torch.log_softmax(x, -1), z)


@pytest.mark.parametrize("seed", range(3))
def test_forward_gradient_is_soft_target_cross_entropy(seed):
    """∇ KL(p_T‖q_θ) = −E_{v∼p_T} ∇ log q_θ(v)  (docs/concepts.md, the two axes)."""
    student, teacher = (x[0, 0] for x in logits_pair(seed=seed))
    student.requires_grad_(True)
    (grad,) = torch.autograd.grad(per_token_divergence(student, teacher, kl_direction="forward"), student)
    p = torch.softmax(teacher, -1)
    expected = -(p.unsqueeze(-1) * _jacobian_log_softmax(student.detach())).sum(0)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("seed", range(3))
def test_reverse_gradient_is_policy_gradient_with_dense_reward(seed):
    """∇ KL(q_θ‖p_T) = E_{v∼q_θ}[(log q_θ(v) − log p_T(v)) ∇ log q_θ(v)]  (docs/concepts.md, the two axes)."""
    student, teacher = (x[0, 0] for x in logits_pair(seed=seed))
    student.requires_grad_(True)
    (grad,) = torch.autograd.grad(per_token_divergence(student, teacher, kl_direction="reverse"), student)
    log_q, log_p = torch.log_softmax(student.detach(), -1), torch.log_softmax(teacher, -1)
    weights = log_q.exp() * (log_q - log_p)
    expected = (weights.unsqueeze(-1) * _jacobian_log_softmax(student.detach())).sum(0)
    torch.testing.assert_close(grad, expected)


def _np_topk_reference(student, teacher, support, k, tail, direction, weight=0.5, beta=0.5):
    """Independent top-k divergence: explicit index sets, renormalised or with one tail bucket, in numpy."""
    s, t = student.numpy(), teacher.numpy()
    out = np.zeros(s.shape[:-1])
    for pos in itertools.product(*(range(n) for n in s.shape[:-1])):
        zs, zt = s[pos], t[pos]
        top_t = set(np.argsort(-zt, kind="stable")[:k].tolist())
        top_s = set(np.argsort(-zs, kind="stable")[:k].tolist())
        ids = sorted({"teacher_topk": top_t, "student_topk": top_s, "union_topk": top_t | top_s}[support])
        ps, pt = np_softmax(zs), np_softmax(zt)
        if tail:
            qs = np.append(ps[ids], 1 - ps[ids].sum())
            qt = np.append(pt[ids], 1 - pt[ids].sum())
        else:
            qs, qt = ps[ids] / ps[ids].sum(), pt[ids] / pt[ids].sum()
        out[pos] = np_divergence(qs, qt, direction, weight, beta)
    return out


@pytest.mark.parametrize("support,direction,tail", list(itertools.product(TOPK, DIRECTIONS, (False, True))))
def test_topk_supports_match_explicit_sets(support, direction, tail):
    student, teacher = logits_pair(scale=1.5)
    got = per_token_divergence(
        student,
        teacher,
        kl_direction=direction,
        loss_support=support,
        loss_top_k=4,
        loss_add_tail=tail,
        beta=0.3,
        forward_kl_weight=0.6,
    )
    expected = _np_topk_reference(student, teacher, support, 4, tail, direction, weight=0.6, beta=0.3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("support,direction", list(itertools.product(TOPK, DIRECTIONS)))
def test_truncated_kl_with_tail_is_never_negative_on_adversarial_logits(support, direction):
    """Supports holding ~all or ~none of one side's mass, huge logit ranges, fp32: the tail keeps KL ≥ 0."""
    cases = []
    generator = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 30.0, 1e3):
        student = torch.randn(64, 50, generator=generator) * scale
        teacher = torch.randn(64, 50, generator=generator) * scale
        cases.append((student, teacher))
    peaked = torch.full((8, 50), -30.0)
    peaked[:, 0] = 30.0
    opposite = torch.full((8, 50), -30.0)
    opposite[:, -1] = 30.0
    cases += [(peaked, opposite), (opposite, peaked), (peaked, peaked + 1e-6)]
    for student, teacher in cases:
        for k in (1, 3, 49):
            got = per_token_divergence(
                student, teacher, kl_direction=direction, loss_support=support, loss_top_k=k, loss_add_tail=True
            )
            assert torch.isfinite(got).all() and (got >= 0).all(), (k, got.min())


def test_union_support_counts_shared_tokens_once():
    student = torch.tensor([[5.0, 4.0, 3.0, 0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 4.0, 5.0, 3.0, 0.0, 0.0]])
    union = per_token_divergence(student, teacher, kl_direction="reverse", loss_support="union_topk", loss_top_k=3)
    ids = [0, 1, 2, 3]  # top-3 student {0,1,2} ∪ top-3 teacher {1,2,3}
    expected = np_kl(np_softmax(student.numpy()[0, ids]), np_softmax(teacher.numpy()[0, ids]))
    np.testing.assert_allclose(union.numpy(), [expected], rtol=1e-6)


def test_sampled_token_value_is_the_log_ratio():
    student, teacher = logits_pair()
    tokens = torch.randint(0, student.shape[-1], student.shape[:-1], generator=torch.Generator().manual_seed(1))
    log_q = torch.log_softmax(student, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    log_p = torch.log_softmax(teacher, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    reverse = per_token_divergence(
        student, teacher, kl_direction="reverse", loss_support="sampled_token", sampled_token_ids=tokens
    )
    forward = per_token_divergence(
        student, teacher, kl_direction="forward", loss_support="sampled_token", sampled_token_ids=tokens
    )
    torch.testing.assert_close(reverse, log_q - log_p)
    torch.testing.assert_close(forward, log_p - log_q)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_sampled_token_gradient_is_exact_kl_gradient_in_expectation(direction):
    """Σ_y P(y) ∇ surrogate(y) over every token y of a tiny vocabulary equals ∇ of the full KL (docs/concepts.md)."""
    student, teacher = (x[0, 0] for x in logits_pair(shape=(1, 1, 7), seed=3))
    student.requires_grad_(True)
    vocab = torch.arange(7)
    values = per_token_divergence(
        student.expand(7, 7),
        teacher.expand(7, 7),
        kl_direction=direction,
        loss_support="sampled_token",
        sampled_token_ids=vocab,
    )
    sampler = student.detach() if direction == "reverse" else teacher
    probabilities = torch.softmax(sampler, -1)
    (expected_grad,) = torch.autograd.grad((probabilities * values).sum(), student)
    (exact_grad,) = torch.autograd.grad(per_token_divergence(student, teacher, kl_direction=direction), student)
    torch.testing.assert_close(expected_grad, exact_grad)
    torch.testing.assert_close(
        (probabilities * values.detach()).sum(),
        per_token_divergence(student.detach(), teacher, kl_direction=direction),
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_support="teacher_topk", loss_top_k=12), "loss_top_k"),
        (dict(loss_support="student_topk", loss_top_k=0), "loss_top_k"),
        (dict(kl_direction="backward"), "kl_direction"),
        (dict(loss_support="top_k"), "loss_support"),
        (dict(loss_add_tail=True), "loss_add_tail"),
        (dict(loss_support="sampled_token"), "sampled_token_ids"),
        (dict(loss_support="sampled_token", kl_direction="jsd", sampled_token_ids=torch.zeros(3, 5).long()), "jsd"),
    ],
)
def test_invalid_arguments_name_the_fix(kwargs, match):
    student, teacher = logits_pair()
    with pytest.raises(ValueError, match=match):
        per_token_divergence(student, teacher, **kwargs)


def test_vocabulary_mismatch_is_reported():
    with pytest.raises(ValueError, match="vocabulary"):
        per_token_divergence(torch.zeros(2, 10), torch.zeros(2, 12))
