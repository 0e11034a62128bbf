"""Answer extraction, math-verify checking, Avg@k / Pass@k / length / truncation metrics and gap recovery."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from trl_opd.evaluation import evaluate, extract_answer, gap_recovery, heldout_divergence, is_correct, score
from trl_opd.toy import build_model, make_dataset

pytest.importorskip("math_verify")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3+5=8\n8+2=10\n#### 10", "10"),
        ("####10", "10"),
        ("#### -3", "-3"),
        ("#### 1,234.", "1234"),
        ("#### 12 apples", "12"),
        ("#### 1/2", "1/2"),
        ("#### $1,000", "1000"),
        ("#### 4\nwait, no\n#### 5", "5"),  # the last answer line wins
        ("so the result is \\boxed{7}", "7"),
        ("#### 9 and \\boxed{7}", "9"),  # the answer line has priority over \boxed
        ("3+4=7\n#### ", "7"),  # an empty answer line falls back to the last number
        ("the total is 12 apples, then 42", "42"),
        ("x = 2.5", "2.5"),
        ("no digits at all", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("#### 10", "10", True),
        ("#### 10.0", "10", True),
        ("#### 10", "10.0", True),
        ("#### 1,234", "1234", True),
        ("#### 1/2", "0.5", True),
        ("#### -2", "-2", True),
        ("#### 11", "10", False),
        ("#### 2", "-2", False),
        ("I don't know", "3", False),
    ],
)
def test_is_correct_uses_math_verify_equivalence(completion, answer, expected):
    assert is_correct(completion, answer) is expected


def test_score_defines_accuracy_avg_and_pass_at_k():
    flags = [[False, True], [True, True], [False, False]]
    assert score(flags) == pytest.approx({"accuracy": 1 / 3, "avg_at_k": 0.5, "pass_at_k": 2 / 3})


@pytest.mark.parametrize("flags", [[], [[True], [True, False]], [[]]])
def test_score_rejects_ragged_or_empty_input(flags):
    with pytest.raises(ValueError):
        score(flags)


class ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM: `generate` returns, for each prompt, the completions scripted for its question."""

    def __init__(self, tokenizer, script: dict[str, list[str]]):
        super().__init__()
        self.tokenizer, self.script = tokenizer, script
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.generation_config = type("GenerationConfig", (), {"eos_token_id": tokenizer.eos_token_id})()
        self.calls = []

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def generate(self, input_ids, attention_mask, *, max_new_tokens, num_return_sequences, eos_token_id, **kwargs):
        self.calls.append({"training": self.training, "eos_token_id": eos_token_id, **kwargs})
        rows = []
        for prompt in self.tokenizer.batch_decode(input_ids, skip_special_tokens=True):
            question = prompt.split("\n")[1]  # "user\n<question>\nassistant\n" once the special tokens are gone
            completions = self.script[question]
            assert len(completions) == num_return_sequences
            for completion in completions:
                ids = self.tokenizer(completion, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
                rows.append(torch.tensor(ids[:max_new_tokens]))
        completion_ids = torch.nn.utils.rnn.pad_sequence(
            rows, batch_first=True, padding_value=self.tokenizer.pad_token_id
        )
        return torch.cat([input_ids.repeat_interleave(num_return_sequences, dim=0), completion_ids], dim=1)


def questions_dataset(answers: dict[str, str]) -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": question}] for question in answers],
            "answer": list(answers.values()),
        }
    )


def test_evaluate_counts_avg_pass_length_and_truncation(tokenizer):
    # Three problems, k=2: first samples right on 1/3 problems, 3/6 samples right, 2/3 problems solved at least once.
    script = {
        "What is 1+1?": ["#### 3", "1+1=2\n#### 2"],
        "What is 2+2?": ["#### 4", "#### 4.0"],
        "What is 3+3?": ["#### 7", "3+3=5 and then a lot of rambling"],  # the second one is cut by max_new_tokens
    }
    dataset = questions_dataset({"What is 1+1?": "2", "What is 2+2?": "4", "What is 3+3?": "6"})
    model = ScriptedModel(tokenizer, script)
    metrics = evaluate(model, tokenizer, dataset, k=2, max_new_tokens=20, batch_size=2, progress=False)
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    assert metrics["avg_at_k"] == pytest.approx(0.5)
    assert metrics["pass_at_k"] == pytest.approx(2 / 3)
    assert metrics["k"] == 2 and metrics["n_problems"] == 3
    # Token lengths (one character per token, EOS counted): 7, 13, 7, 9, 7 and the truncated 20.
    assert metrics["mean_length"] == pytest.approx((7 + 13 + 7 + 9 + 7 + 20) / 6)
    assert metrics["truncation_rate"] == pytest.approx(1 / 6)
    assert len(model.calls) == 2  # batches of two problems
    assert all(not call["training"] and call["do_sample"] and call["temperature"] == 1.0 for call in model.calls)
    assert all(call["eos_token_id"] == [tokenizer.eos_token_id] for call in model.calls)


def test_evaluate_greedy_and_restores_state(tokenizer):
    dataset = questions_dataset({"What is 1+1?": "2"})
    model = ScriptedModel(tokenizer, {"What is 1+1?": ["#### 2"]}).train()
    tokenizer.padding_side = "right"
    try:
        metrics = evaluate(model, tokenizer, dataset, temperature=0, progress=False)
        assert tokenizer.padding_side == "right"
    finally:
        tokenizer.padding_side = "left"
    assert metrics["accuracy"] == 1.0 and metrics["truncation_rate"] == 0.0
    assert model.calls[0]["do_sample"] is False
    assert model.training
    with pytest.raises(ValueError, match="identical samples"):
        evaluate(model, tokenizer, dataset, k=2, temperature=0, progress=False)


def test_evaluate_real_model_is_seeded(tokenizer):
    model = build_model(tokenizer, hidden_size=32, num_layers=1, seed=0)
    dataset = make_dataset(6, seed=0, split="eval")
    kwargs = dict(k=3, max_new_tokens=12, batch_size=4, progress=False)
    first = evaluate(model, tokenizer, dataset, seed=1, **kwargs)
    assert first == evaluate(model, tokenizer, dataset, seed=1, **kwargs)
    assert first["n_problems"] == 6 and first["k"] == 3
    assert 0 <= first["accuracy"] <= 1 and first["avg_at_k"] <= first["pass_at_k"]
    assert 1 <= first["mean_length"] <= 12
    # An untrained model almost never closes its turn within 12 tokens.
    assert first["truncation_rate"] > 0.5


def test_heldout_divergence_matches_per_sequence_categorical_kl(tokenizer):
    """Batched, left-padded and EOS-truncated, the held-out KL equals torch.distributions' KL computed one unpadded
    sequence at a time over each completion up to its first EOS."""
    student = build_model(tokenizer, hidden_size=32, num_layers=1, seed=0)
    teacher = build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)
    dataset = make_dataset(5, seed=0, split="eval")
    eos = tokenizer.eos_token_id
    student.generation_config.eos_token_id = eos
    generated = []
    generate = student.generate
    student.generate = lambda **kwargs: generated.append((kwargs["input_ids"], generate(**kwargs))) or generated[-1][1]
    stats = heldout_divergence(student, teacher, tokenizer, dataset, max_new_tokens=10, batch_size=2, progress=False)

    reverse, forward, entropy, n_tokens = [], [], [], 0
    for inputs, output in generated:
        for prompt_ids, row in zip(inputs, output):
            prompt = prompt_ids[prompt_ids != tokenizer.pad_token_id]
            completion = row[len(prompt_ids) :]
            ends = (completion == eos).nonzero()
            completion = completion[: int(ends[0]) + 1] if len(ends) else completion
            sequence = torch.cat([prompt, completion]).unsqueeze(0)
            with torch.no_grad():
                q_logits = student(input_ids=sequence).logits[0, len(prompt) - 1 : -1]
                p_logits = teacher(input_ids=sequence).logits[0, len(prompt) - 1 : -1]
            q, p = torch.distributions.Categorical(logits=q_logits), torch.distributions.Categorical(logits=p_logits)
            reverse.append(torch.distributions.kl_divergence(q, p))
            forward.append(torch.distributions.kl_divergence(p, q))
            entropy.append(q.entropy())
            n_tokens += len(completion)
    assert stats["n_tokens"] == n_tokens and stats["n_problems"] == 5
    assert stats["reverse_kl"] == pytest.approx(torch.cat(reverse).mean().item(), rel=1e-4)
    assert stats["forward_kl"] == pytest.approx(torch.cat(forward).mean().item(), rel=1e-4)
    assert stats["student_entropy"] == pytest.approx(torch.cat(entropy).mean().item(), rel=1e-4)
    assert stats["reverse_kl"] > 0.01  # two different random models


def test_heldout_divergence_of_a_model_with_itself_is_zero(tokenizer):
    model = build_model(tokenizer, hidden_size=32, num_layers=1, seed=0).train()
    stats = heldout_divergence(
        model, model, tokenizer, make_dataset(3, split="eval"), max_new_tokens=8, progress=False
    )
    assert stats["reverse_kl"] == pytest.approx(0, abs=1e-6) and stats["forward_kl"] == pytest.approx(0, abs=1e-6)
    assert stats["overlap_ratio"] == pytest.approx(1.0) and stats["overlap_mass_student"] <= 1.0
    assert model.training, "the models' train/eval modes are restored"


def test_gap_recovery():
    assert gap_recovery(teacher=0.9, before=0.2, after=0.55) == pytest.approx(0.5)
    assert gap_recovery(teacher=0.9, before=0.2, after=0.9) == pytest.approx(1.0)
    assert gap_recovery(teacher=0.9, before=0.2, after=0.1) == pytest.approx(-1 / 7)
    assert math.isnan(gap_recovery(teacher=0.5, before=0.5, after=0.7))  # no gap to recover
    assert math.isnan(gap_recovery(teacher=0.4, before=0.5, after=0.7))  # the student started ahead
