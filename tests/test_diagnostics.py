"""Diagnostics against hand-computed values, and the stabilisers' effect on the loss."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_config, make_dataset
from peft import LoraConfig
from torch.distributions import Categorical

from trl_opd import OPDTrainer
from trl_opd.diagnostics import (
    compression_ratio,
    repeated_token_mask,
    repetition_rate,
    repetition_threshold,
    token_diagnostics,
    truncation_rate,
)


def test_repetition_rate_flags_periodic_tails_only():
    rng = random.Random(0)
    prose = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 +=") for _ in range(400))
    looping = "the answer is 4. " * 24
    threshold = repetition_threshold(400)
    assert compression_ratio(prose) < threshold < compression_ratio(looping[-400:])
    assert repetition_rate([prose, looping, prose, looping], tail_chars=400, threshold=threshold) == 0.5
    assert repetition_rate([], 400, threshold) == 0.0


def test_repetition_threshold_scales_from_the_paper():
    assert repetition_threshold(10_000) == 10.0
    assert repetition_threshold(20_000) == 20.0
    assert repetition_threshold(100) == 3.0


def test_truncation_rate_counts_max_length_without_eos():
    eos = 2
    rows = [[5, 6, 7, 8], [5, 6, eos], [5, 6, 7, eos], [9, 9]]
    assert truncation_rate(rows, [eos], max_length=4) == 0.25  # only the first: full length, no EOS
    assert truncation_rate(rows, [eos], max_length=2) == 0.5  # [9, 9] too


def test_repeated_token_mask_marks_recurring_ngrams():
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 4, 1, 2]])
    got = repeated_token_mask(ids, n=2)
    assert got.tolist() == [[False, False, False, False, True, True, False, False, True]]


def test_token_diagnostics_match_explicit_computation():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 20, generator=generator) * 2
    teacher = torch.randn(6, 20, generator=generator) * 2
    tokens = torch.randint(0, 20, (6,), generator=generator)
    repeated = torch.tensor([True, False, True, False, False, False])
    stats = token_diagnostics(student, teacher, tokens, k=5, repeated=repeated)
    q, p = student.softmax(-1), teacher.softmax(-1)
    ratios, mass_q, mass_p = [], [], []
    for row in range(6):
        top_q = set(student[row].topk(5).indices.tolist())
        top_p = set(teacher[row].topk(5).indices.tolist())
        shared = sorted(top_q & top_p)
        ratios.append(len(shared) / 5)
        mass_q.append(q[row, shared].sum().item())
        mass_p.append(p[row, shared].sum().item())
    h_q, h_p = Categorical(logits=student).entropy(), Categorical(logits=teacher).entropy()
    log_ratio = (q.log() - p.log())[torch.arange(6), tokens]
    expected = {
        "overlap_ratio": sum(ratios) / 6,
        "overlap_mass_student": sum(mass_q) / 6,
        "overlap_mass_teacher": sum(mass_p) / 6,
        "student_entropy": h_q.mean().item(),
        "teacher_entropy": h_p.mean().item(),
        "entropy_gap": (h_p - h_q).abs().mean().item(),
        "log_ratio_mean": log_ratio.mean().item(),
        "log_ratio_std": log_ratio.std(unbiased=False).item(),
        "log_ratio_positive_share": (log_ratio > 0).float().mean().item(),
        "log_ratio_repeated": log_ratio[repeated].mean().item(),
        "log_ratio_non_repeated": log_ratio[~repeated].mean().item(),
    }
    assert stats == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_identical_models_overlap_fully():
    logits = torch.randn(4, 30)
    stats = token_diagnostics(logits, logits.clone(), torch.zeros(4, dtype=torch.long), k=8)
    assert stats["overlap_ratio"] == 1.0 and stats["entropy_gap"] == 0.0 and stats["log_ratio_mean"] == 0.0


def train(student, teacher, tokenizer, tmp_path, peft_config=None, **overrides):
    trainer = OPDTrainer(
        model=student,
        teacher_model=teacher,
        args=make_config(tmp_path, **overrides),
        train_dataset=make_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    return trainer, [entry for entry in trainer.state.log_history if "loss" in entry]


def test_every_logging_step_reports_the_diagnostics(student, teacher, tokenizer, tmp_path):
    _, logs = train(student, teacher, tokenizer, tmp_path, max_steps=2)
    for entry in logs:
        for key in (
            "overlap_ratio",
            "overlap_mass_student",
            "teacher_entropy",
            "entropy_gap",
            "log_ratio_mean",
            "truncation_rate",
            "repetition_rate",
        ):
            assert f"opd/{key}" in entry, key
        assert 0.0 <= entry["opd/overlap_ratio"] <= 1.0
        assert 0.0 <= entry["opd/truncation_rate"] <= 1.0


def test_diagnostics_can_be_turned_off(student, teacher, tokenizer, tmp_path):
    _, logs = train(student, teacher, tokenizer, tmp_path, max_steps=1, diagnostics_max_positions=0)
    assert "opd/overlap_ratio" not in logs[0] and "opd/truncation_rate" in logs[0]


def test_reference_kl_starts_at_zero_and_grows(student, teacher, tokenizer, tmp_path):
    trainer, logs = train(student, teacher, tokenizer, tmp_path, max_steps=4, ref_kl_coef=0.5, learning_rate=0.05)
    assert trainer.ref_model is not None
    assert logs[0]["opd/ref_kl"] == pytest.approx(0.0, abs=1e-6)
    assert logs[-1]["opd/ref_kl"] > 1e-4


def test_reference_kl_with_lora_uses_the_base_model(student, teacher, tokenizer, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer, logs = train(
        student, teacher, tokenizer, tmp_path, peft_config=lora, max_steps=4, ref_kl_coef=0.5, learning_rate=0.05
    )
    assert trainer.ref_model is None  # no second copy: the adapter is switched off instead
    assert logs[0]["opd/ref_kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts as the identity
    assert logs[-1]["opd/ref_kl"] > 0


def test_gold_sft_adds_the_weighted_gold_nll(student, teacher, tokenizer, tmp_path):
    import copy

    _, plain = train(copy.deepcopy(student), teacher, tokenizer, tmp_path / "a", max_steps=1)
    _, gold = train(student, teacher, tokenizer, tmp_path / "b", max_steps=1, gold_sft_weight=0.5)
    assert gold[0]["opd/gold_nll"] > 1.0  # an untrained model is far from the gold text
    assert gold[0]["loss"] == pytest.approx(plain[0]["loss"] + 0.5 * gold[0]["opd/gold_nll"], rel=1e-4)


def test_gold_sft_needs_a_completion_column(student, teacher, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no `completion` column"):
        OPDTrainer(
            student,
            teacher,
            make_config(tmp_path, gold_sft_weight=0.1),
            make_dataset().remove_columns("completion"),
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("threshold,gate", [(0.0, 1.0), (1e6, 0.0)])
def test_eopd_term_applies_only_above_the_teacher_entropy_gate(student, teacher, tokenizer, tmp_path, threshold, gate):
    import copy

    _, plain = train(copy.deepcopy(student), teacher, tokenizer, tmp_path / "a", max_steps=1)
    _, gated = train(
        student,
        teacher,
        tokenizer,
        tmp_path / "b",
        max_steps=1,
        eopd_coef=1.0,
        eopd_entropy_threshold=threshold,
        loss_top_k=8,
    )
    assert gated[0]["opd/eopd_gate_share"] == gate
    if gate:
        assert gated[0]["loss"] > plain[0]["loss"]
    else:
        assert gated[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-6)


def test_head_gradient_coherence_matches_explicit_outer_products():
    from trl_opd.diagnostics import head_gradient_coherence

    generator = torch.Generator().manual_seed(0)
    grads, hidden = torch.randn(5, 12, generator=generator), torch.randn(5, 7, generator=generator)
    outer = torch.einsum("tv,th->tvh", grads, hidden)
    expected = outer.sum(0).norm() / outer.flatten(1).norm(dim=-1).sum()
    assert head_gradient_coherence(grads, hidden) == pytest.approx(expected.item(), rel=1e-6)
    same = grads[:1].repeat(5, 1)
    assert head_gradient_coherence(same, hidden[:1].repeat(5, 1)) == pytest.approx(1.0)
    assert head_gradient_coherence(torch.cat([grads[:1], -grads[:1]]), hidden[:1].repeat(2, 1)) == pytest.approx(0.0)


def test_gradient_coherence_is_logged_when_asked(student, teacher, tokenizer, tmp_path):
    _, logs = train(student, teacher, tokenizer, tmp_path, max_steps=1, diagnostics_gradient_coherence=True)
    assert 0.0 < logs[0]["opd/gradient_coherence"] <= 1.0
