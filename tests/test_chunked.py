"""The trainer's memory-lean paths agree with `per_token_divergence` on explicitly projected logits (fp32, 1e-5)."""

from __future__ import annotations

import itertools

import pytest
import torch

from trl_opd import chunked
from trl_opd.chunked import divergence_from_hidden
from trl_opd.heads import OutputHead
from trl_opd.losses import Divergence, per_token_divergence

SUPPORTS = ("full", "teacher_topk", "student_topk", "union_topk")
DIRECTIONS = ("forward", "reverse", "jsd", "mixed")


def heads(bias: bool, scale: float, softcap: float | None, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    n, h_s, h_t, vocab = 29, 16, 24, 97  # teacher wider than student: only the vocabulary must match
    student_hidden = torch.randn(n, h_s, generator=generator).requires_grad_(True)
    teacher_hidden = torch.randn(n, h_t, generator=generator)
    student_weight = (torch.randn(vocab, h_s, generator=generator) * 0.5).requires_grad_(True)
    teacher_weight = torch.randn(vocab, h_t, generator=generator) * 0.5
    student_bias = torch.randn(vocab, generator=generator).requires_grad_(True) if bias else None
    teacher_bias = torch.randn(vocab, generator=generator) if bias else None
    student = OutputHead(student_weight, student_bias, scale, softcap, temperature=1.3)
    teacher = OutputHead(teacher_weight, teacher_bias, 1.0, softcap, temperature=0.8)
    tokens = torch.randint(0, vocab, (n,), generator=generator)
    return student_hidden, teacher_hidden, student, teacher, tokens


def explicit_logits(hidden, head):
    """The head's raw logits, before temperature (which `per_token_divergence` applies itself)."""
    z = hidden @ head.weight.t() + (0 if head.bias is None else head.bias)
    z = z * head.logit_scale
    return z if head.softcap is None else head.softcap * torch.tanh(z / head.softcap)


def compare(student_hidden, teacher_hidden, student, teacher, tokens, **kwargs):
    params = [student_hidden, student.weight] + ([student.bias] if student.bias is not None else [])
    got, _ = divergence_from_hidden(student_hidden, teacher_hidden, student, teacher, Divergence(**kwargs), tokens)
    got_grads = torch.autograd.grad(got.sum(), params)
    expected = per_token_divergence(
        explicit_logits(student_hidden, student),
        explicit_logits(teacher_hidden, teacher),
        temperature=student.temperature,
        teacher_temperature=teacher.temperature,
        sampled_token_ids=tokens,
        **kwargs,
    )
    expected_grads = torch.autograd.grad(expected.sum(), params)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for got_grad, expected_grad in zip(got_grads, expected_grads):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("support,direction", list(itertools.product(SUPPORTS, DIRECTIONS)))
def test_hidden_state_paths_match_logit_reference(support, direction):
    compare(
        *heads(bias=False, scale=1.0, softcap=None),
        kl_direction=direction,
        loss_support=support,
        loss_top_k=5,
        beta=0.3,
        forward_kl_weight=0.7,
    )


@pytest.mark.parametrize("support", ("teacher_topk", "student_topk", "union_topk"))
def test_tail_bucket_path_matches_logit_reference(support):
    compare(
        *heads(bias=False, scale=1.0, softcap=None),
        kl_direction="reverse",
        loss_support=support,
        loss_top_k=5,
        loss_add_tail=True,
    )


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_sampled_token_path_matches_logit_reference(direction):
    compare(*heads(bias=False, scale=1.0, softcap=None), kl_direction=direction, loss_support="sampled_token")


@pytest.mark.parametrize("support", ["full", "teacher_topk", "sampled_token"])
def test_bias_logit_scale_and_softcap_are_applied(support):
    compare(
        *heads(bias=True, scale=0.7, softcap=5.0, seed=1), kl_direction="reverse", loss_support=support, loss_top_k=5
    )


def test_token_chunking_does_not_change_the_result(monkeypatch):
    inputs = heads(bias=False, scale=1.0, softcap=None, seed=2)
    kwargs = dict(kl_direction="mixed", loss_support="union_topk", loss_top_k=4, loss_add_tail=True)
    whole, _ = divergence_from_hidden(*inputs[:4], Divergence(**kwargs))
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 97 * 3)  # three positions per chunk
    chunks, _ = divergence_from_hidden(*inputs[:4], Divergence(**kwargs))
    torch.testing.assert_close(chunks, whole)


def test_entropy_is_the_students_at_its_temperature():
    student_hidden, teacher_hidden, student, teacher, tokens = heads(bias=False, scale=1.0, softcap=None)
    log_q = torch.log_softmax(explicit_logits(student_hidden, student) / student.temperature, -1)
    expected = -(log_q.exp() * log_q).sum(-1)
    for support in ("full", "teacher_topk", "sampled_token"):
        _, entropy = divergence_from_hidden(
            student_hidden,
            teacher_hidden,
            student,
            teacher,
            Divergence(kl_direction="reverse", loss_support=support, loss_top_k=5),
            tokens,
        )
        torch.testing.assert_close(entropy, expected.detach(), rtol=1e-5, atol=1e-5)


def test_no_loss_positions_gives_a_differentiable_zero():
    student_hidden, teacher_hidden, student, teacher, _ = heads(bias=False, scale=1.0, softcap=None)
    got, entropy = divergence_from_hidden(
        student_hidden[:0], teacher_hidden[:0], student, teacher, Divergence(kl_direction="reverse")
    )
    assert got.shape == (0,) and entropy.shape == (0,)
    got.sum().backward()
    assert student_hidden.grad is not None


def topk_of(teacher_hidden, teacher, tokens, k):
    """What a served or cached teacher returns: its top-k (ids, log-probs) and the prefix token's log-prob."""
    log_probs = torch.log_softmax(explicit_logits(teacher_hidden, teacher) / teacher.temperature, dim=-1)
    top = log_probs.topk(k, dim=-1)
    return top.indices, top.values, log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("direction,tail", [*itertools.product(DIRECTIONS, [False, True])])
def test_teacher_topk_from_log_probs_equals_the_local_teacher(direction, tail):
    student_hidden, teacher_hidden, student, teacher, tokens = heads(bias=True, scale=1.0, softcap=None, seed=4)
    divergence = Divergence(direction, 0.7, 0.3, "teacher_topk", 6, tail)
    local, local_entropy = divergence_from_hidden(student_hidden, teacher_hidden, student, teacher, divergence, tokens)
    ids, log_probs, token_lp = topk_of(teacher_hidden, teacher, tokens, 6)
    served, entropy = chunked.divergence_from_teacher_topk(
        student_hidden, student, ids, log_probs, token_lp, divergence, tokens
    )
    params = [student_hidden, student.weight, student.bias]
    torch.testing.assert_close(served, local, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, local_entropy, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(served.sum(), params), torch.autograd.grad(local.sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_sampled_token_from_log_probs_equals_the_local_teacher(direction):
    student_hidden, teacher_hidden, student, teacher, tokens = heads(bias=False, scale=1.0, softcap=None, seed=5)
    divergence = Divergence(direction, loss_support="sampled_token")
    local, _ = divergence_from_hidden(student_hidden, teacher_hidden, student, teacher, divergence, tokens)
    served, _ = chunked.divergence_from_teacher_topk(
        student_hidden, student, *topk_of(teacher_hidden, teacher, tokens, 3), divergence, tokens
    )
    torch.testing.assert_close(served, local, rtol=1e-5, atol=1e-5)
    (a,) = torch.autograd.grad(served.sum(), student_hidden)
    (b,) = torch.autograd.grad(local.sum(), student_hidden)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("support", ["full", "student_topk", "union_topk"])
def test_a_top_k_teacher_refuses_supports_that_need_its_whole_distribution(support):
    student_hidden, teacher_hidden, student, teacher, tokens = heads(bias=False, scale=1.0, softcap=None)
    with pytest.raises(ValueError, match="teacher_topk.*sampled_token"):
        chunked.divergence_from_teacher_topk(
            student_hidden,
            student,
            *topk_of(teacher_hidden, teacher, tokens, 3),
            Divergence(loss_support=support),
            tokens,
        )
