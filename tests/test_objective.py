"""The objective as data: every term's fast path equals its reference formula in `losses.py` (values and gradients),
the terms follow the config, and `Objective.evaluate` composes them as docs/concepts.md states."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config
from torch.distributions import Categorical

from trl_opd import losses
from trl_opd.heads import OutputHead, Positions
from trl_opd.objective import TERMS, LossBatch, Objective
from trl_opd.teachers import TeacherTopK

VOCAB, N, M = 61, 23, 9


def head(hidden_size: int, temperature: float, seed: int, bias: bool = True) -> OutputHead:
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(VOCAB, hidden_size, generator=generator) * 0.6).requires_grad_(True)
    b = torch.randn(VOCAB, generator=generator).requires_grad_(True) if bias else None
    return OutputHead(weight, b, temperature=temperature)


def hidden(rows: int, size: int, seed: int, grad: bool = False) -> torch.Tensor:
    return torch.randn(rows, size, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


def logits(positions: Positions) -> torch.Tensor:
    """Explicit (n, V) logits with the temperature applied: what the references in `losses` take."""
    z = positions.hidden @ positions.head.weight.t()
    return (z if positions.head.bias is None else z + positions.head.bias) / positions.head.temperature


@pytest.fixture
def batch() -> LossBatch:
    student_head = head(16, 1.3, 0)
    return LossBatch(
        student=Positions(hidden(N, 16, 1, grad=True), student_head),
        teacher=Positions(hidden(N, 24, 2) * 2.0, head(24, 0.8, 3)),
        token_ids=torch.randint(0, VOCAB, (N,), generator=torch.Generator().manual_seed(4)),
        reference=Positions(hidden(N, 16, 5), head(16, 1.3, 6)),
        gold=Positions(hidden(M, 16, 7, grad=True), student_head),
        gold_ids=torch.randint(0, VOCAB, (M,), generator=torch.Generator().manual_seed(8)),
    )


def objective(tmp_path, **overrides) -> Objective:
    return Objective.from_args(make_config(tmp_path, **overrides))


def assert_same_with_gradients(got: torch.Tensor, expected: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for got_grad, expected_grad in zip(
        torch.autograd.grad(got.sum(), inputs), torch.autograd.grad(expected.sum(), inputs)
    ):
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_terms_follow_the_config(tmp_path):
    plain = objective(tmp_path)
    assert [term.name for term, _ in plain.terms] == ["divergence"]
    assert plain.metric_names == []
    every = objective(
        tmp_path, ref_kl_coef=0.3, eopd_coef=0.2, gold_sft_weight=0.1, prefix_source="dataset", kl_direction="forward"
    )
    assert [(term.name, weight) for term, weight in every.terms] == [
        ("divergence", 1.0),
        ("ref_kl", 0.3),
        ("eopd", 0.2),
        ("gold_sft", 0.1),
    ]
    assert every.metric_names == ["opd/ref_kl", "opd/eopd_gate_share", "opd/gold_nll"]
    assert every.divergence.kl_direction == "forward" and every.divergence.beta == 1.0  # the config's (TRL's) beta


def test_every_term_names_an_existing_config_field_and_a_reference_in_losses(tmp_path):
    args = make_config(tmp_path)
    for term in TERMS:
        assert term.coefficient is None or hasattr(args, term.coefficient)
        assert getattr(losses, term.reference.__name__) is term.reference


@pytest.mark.parametrize("support", ["full", "teacher_topk", "sampled_token"])
def test_main_term_matches_its_reference(tmp_path, batch, support):
    direction = "reverse" if support == "sampled_token" else "mixed"
    term = objective(tmp_path, loss_support=support, kl_direction=direction, loss_top_k=7)
    main = TERMS[0]
    got = main.fast(batch, term).values
    expected = main.reference(logits(batch.student), logits(batch.teacher), term.divergence, batch.token_ids)
    assert_same_with_gradients(got, expected, [batch.student.hidden, batch.student.head.weight])


def test_reference_kl_term_matches_its_reference(tmp_path, batch):
    term = TERMS[1]
    value = term.fast(batch, objective(tmp_path, ref_kl_coef=1.0))
    expected = term.reference(logits(batch.student), logits(batch.reference))
    assert_same_with_gradients(value.values, expected, [batch.student.hidden, batch.student.head.weight])
    per_position = [
        torch.distributions.kl_divergence(Categorical(logits=q), Categorical(logits=r))
        for q, r in zip(logits(batch.student), logits(batch.reference))
    ]
    torch.testing.assert_close(expected, torch.stack(per_position), rtol=1e-5, atol=1e-5)
    assert value.metrics["opd/ref_kl"][1] == N


@pytest.mark.parametrize("threshold", [0.0, 2.5, 100.0])
def test_eopd_term_matches_its_reference(tmp_path, batch, threshold):
    term = TERMS[2]
    value = term.fast(batch, objective(tmp_path, eopd_coef=1.0, loss_top_k=5, eopd_entropy_threshold=threshold))
    expected, gate = term.reference(logits(batch.student), logits(batch.teacher), 5, threshold)
    assert_same_with_gradients(value.values, expected, [batch.student.hidden, batch.student.head.weight])
    teacher_entropy = Categorical(logits=logits(batch.teacher)).entropy()
    torch.testing.assert_close(gate, (teacher_entropy > threshold).float())
    assert value.metrics["opd/eopd_gate_share"] == (pytest.approx(gate.sum()), N)


def test_eopd_reference_is_forward_kl_on_the_renormalised_teacher_topk():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, VOCAB, generator=generator), torch.randn(4, VOCAB, generator=generator)
    term, gate = losses.entropy_gated_forward_kl(student, teacher, 6, 0.0)
    assert bool(gate.all())
    index = teacher.topk(6, -1).indices
    expected = torch.distributions.kl_divergence(
        Categorical(logits=teacher.gather(-1, index)), Categorical(logits=student.gather(-1, index))
    )
    torch.testing.assert_close(term, expected)


def test_gold_term_matches_its_reference(tmp_path, batch):
    term = TERMS[3]
    value = term.fast(batch, objective(tmp_path, gold_sft_weight=1.0, prefix_source="dataset"))
    expected = term.reference(logits(batch.gold), batch.gold_ids)
    assert_same_with_gradients(value.values, expected, [batch.gold.hidden, batch.gold.head.weight])
    torch.testing.assert_close(expected, -Categorical(logits=logits(batch.gold)).log_prob(batch.gold_ids))


def test_evaluate_weights_and_sums_the_terms(tmp_path, batch):
    settings = dict(ref_kl_coef=0.3, eopd_coef=0.2, gold_sft_weight=0.1, prefix_source="dataset", loss_top_k=5)
    whole = objective(tmp_path, **settings)
    value = whole.evaluate(batch)
    expected = sum(weight * term.fast(batch, whole).values for term, weight in whole.terms if term.over == "positions")
    torch.testing.assert_close(value.per_position, expected)
    torch.testing.assert_close(value.per_gold_token, 0.1 * TERMS[3].fast(batch, whole).values)
    assert set(value.metrics) == set(whole.metric_names)
    student_entropy = Categorical(logits=logits(batch.student)).entropy()
    torch.testing.assert_close(value.entropy, student_entropy.detach(), rtol=1e-5, atol=1e-5)


def test_nonfinite_inputs_are_named(batch):
    poisoned = LossBatch(
        batch.student,
        Positions(batch.teacher.hidden.clone().index_fill_(0, torch.tensor([3]), float("nan")), batch.teacher.head),
        batch.token_ids,
    )
    assert poisoned.nonfinite() == ["teacher"]
    assert batch.nonfinite() == []
    padded = torch.tensor([[-0.1, float("-inf")]])  # −inf is a top-k teacher's padding, not an error
    topk = TeacherTopK(torch.zeros(1, 2, dtype=torch.long), padded, torch.tensor([-0.1]))
    assert LossBatch(batch.student, topk, batch.token_ids).nonfinite() == []
    nan = TeacherTopK(topk.ids, padded, torch.tensor([float("nan")]))
    assert LossBatch(batch.student, nan, batch.token_ids).nonfinite() == ["teacher"]
