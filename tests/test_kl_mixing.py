"""KL mixing's reported tradeoff on a toy task: a reverse-heavy mix sharpens the student, a forward-heavy one keeps
entropy (docs/concepts.md, KL mixing; arXiv 2605.16826)."""

from __future__ import annotations

import torch
from conftest import make_config, make_dataset

from trl_opd import OPDTrainer
from trl_opd.toy import build_model


def final_entropy(tokenizer, tmp_path, forward_kl_weight: float) -> float:
    """Student entropy (mean of the last 5 steps) after 40 steps towards a sharp, context-dependent teacher.

    The student is too small (hidden size 4) to follow the teacher's context dependence, the regime where the
    directions differ: forward KL covers every token the teacher likes in some context (mass-covering), reverse KL
    concentrates on the tokens it likes everywhere (mode-seeking). Dataset prefixes keep the batches identical.
    """
    teacher = build_model(tokenizer, hidden_size=48, num_layers=2, seed=10)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)  # near-deterministic, context-dependent next tokens
    args = make_config(
        tmp_path / str(forward_kl_weight),
        max_steps=40,
        learning_rate=0.1,
        per_device_train_batch_size=8,
        prefix_source="dataset",
        kl_direction="mixed",
        forward_kl_weight=forward_kl_weight,
    )
    student = build_model(tokenizer, hidden_size=4, num_layers=1, num_heads=1, seed=0)
    trainer = OPDTrainer(student, teacher, args, make_dataset(16), processing_class=tokenizer)
    trainer.train()
    entropy = [entry["entropy"] for entry in trainer.state.log_history if "entropy" in entry]
    return sum(entropy[-5:]) / 5


def test_forward_heavy_mix_keeps_more_entropy_than_reverse_heavy(tokenizer, tmp_path):
    forward_heavy = final_entropy(tokenizer, tmp_path, 0.9)
    reverse_heavy = final_entropy(tokenizer, tmp_path, 0.1)
    assert forward_heavy > reverse_heavy + 0.3  # over seeds 0-2 of both models: 1.39-1.58 vs 0.84-0.91 nats
