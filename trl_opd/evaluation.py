"""Answer extraction, math-verify checking, sampled-accuracy metrics (Avg@k, Pass@k, length, truncation) and the
held-out teacher-student divergence.

Definitions, for N problems with k sampled completions each and c_i of problem i's completions correct:
- Avg@k = (1/N) Σ_i c_i / k, the expected accuracy of one sample, estimated with k samples per problem;
- Pass@k = (1/N) Σ_i 1[c_i ≥ 1], the share of problems solved by at least one of the k samples;
- accuracy = Avg@1 on the first sample of each problem (with greedy decoding, the greedy accuracy).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .diagnostics import token_diagnostics
from .losses import kl_divergence
from .rollouts import completion_mask, eos_token_ids, sampling_context

ANSWER_LINE = re.compile(r"####\s*(.+)")
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
HELDOUT_DIAGNOSTICS = (
    "student_entropy",
    "teacher_entropy",
    "overlap_ratio",
    "overlap_mass_student",
    "overlap_mass_teacher",
)


def _clean(answer: str) -> str:
    """Drop what decorates a number without changing it: thousands separators, `$` and a closing period."""
    return answer.strip().replace(",", "").replace("$", "").rstrip(".").strip()


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, as a string for math-verify to parse.

    In order of preference: the first word of the last `#### x` line (GSM8K's convention and the toy world's, so
    "#### 10 apples" gives "10"), the content of the last `\\boxed{x}`, the last number in the text; None when there
    is none of these. Thousands separators, `$` and a closing period are dropped ("#### $1,234." gives "1234").
    """
    lines = [_clean(line) for line in ANSWER_LINE.findall(text)]
    if lines and lines[-1]:
        return lines[-1].split()[0]
    boxed = [_clean(content) for content in BOXED.findall(text)]
    if boxed and boxed[-1]:
        return boxed[-1]
    numbers = NUMBER.findall(text)
    return _clean(numbers[-1]) if numbers else None


def is_correct(completion: str, answer: str) -> bool:
    """Whether the answer extracted from `completion` equals the gold `answer` according to math-verify (so "10" equals
    "10.0" and "1/2" equals "0.5"); a completion with no extractable answer is wrong."""
    try:
        from math_verify import parse, verify
    except ImportError as error:
        raise ImportError("Answer checking needs math-verify: `pip install trl-opd[math]`.") from error

    prediction = extract_answer(completion)
    if prediction is None:
        return False
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(_clean(answer), parsing_timeout=timeout)
    return bool(gold) and verify(gold, parse(prediction, parsing_timeout=timeout), timeout_seconds=timeout)


def score(correct: Sequence[Sequence[bool]]) -> dict[str, float]:
    """Accuracy (first sample), Avg@k and Pass@k of per-problem lists of k correctness flags (module docstring)."""
    if not correct or any(len(flags) != len(correct[0]) or not flags for flags in correct):
        raise ValueError("score needs at least one problem and the same number k ≥ 1 of samples for every problem.")
    return {
        "accuracy": sum(flags[0] for flags in correct) / len(correct),
        "avg_at_k": sum(sum(flags) / len(flags) for flags in correct) / len(correct),
        "pass_at_k": sum(any(flags) for flags in correct) / len(correct),
    }


def _prompt_text(prompt: Any, tokenizer: Any) -> str:
    """A dataset prompt as model input: conversational prompts go through the chat template with the generation
    prompt appended; plain strings are used as they are."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _prompt_batches(
    prompts: Sequence[Any], tokenizer: Any, batch_size: int, device: torch.device, desc: str, progress: bool
) -> Iterator[tuple[int, Any]]:
    """(start index, tokenised left-padded batch) for `prompts` in batches of `batch_size`, with a progress bar."""
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress):
        batch = [_prompt_text(prompt, tokenizer) for prompt in prompts[start : start + batch_size]]
        yield start, tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


@torch.no_grad()
def evaluate(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    k: int = 1,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Sample `k` completions per problem of `dataset` (columns `prompt` and `answer`) and score them.

    Generation is HF `generate` on left-padded prompts (the chat template with the generation prompt), stopping at
    EOS. Sampling is plain temperature / top-p sampling (the model's own generation defaults such as `top_k` are
    overridden, so that the metric measures the distribution being distilled); `temperature=0` decodes greedily, which
    allows only `k=1`. Sampling is seeded with `seed` without touching the global RNG state, so calls are comparable.

    Returns `accuracy` (Avg@1 of the first sample), `avg_at_k`, `pass_at_k` (defined in the module docstring), `k`,
    `mean_length` (completion tokens per sample, the EOS included), `truncation_rate` (share of samples that reached
    `max_new_tokens` without an EOS) and `n_problems`.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    if temperature == 0 and k > 1:
        raise ValueError("Greedy decoding (temperature=0) gives k identical samples: use k=1 or a temperature > 0.")
    prompts, answers = list(dataset["prompt"]), list(dataset["answer"])
    eos_ids = eos_token_ids(model, tokenizer)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    generation_kwargs = {
        "max_new_tokens": max_new_tokens,
        "num_return_sequences": k,
        "eos_token_id": eos_ids,
        "pad_token_id": tokenizer.pad_token_id,
        **(sampling if temperature > 0 else {"do_sample": False}),
    }
    correct, lengths, truncated = [], [], []
    with sampling_context([model], seed, tokenizer):
        for start, inputs in _prompt_batches(prompts, tokenizer, batch_size, model.device, "evaluate", progress):
            output = model.generate(**inputs, **generation_kwargs)
            completion_ids = output[:, inputs["input_ids"].shape[1] :].cpu()
            has_end = torch.isin(completion_ids, torch.tensor(eos_ids)).any(dim=1)
            length = completion_mask(completion_ids, eos_ids).sum(dim=1)
            completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
            for i, answer in enumerate(answers[start : start + batch_size]):
                correct.append([is_correct(completion, answer) for completion in completions[i * k : (i + 1) * k]])
            lengths.extend(length.tolist())
            truncated.extend((~has_end).tolist())
    return {
        **score(correct),
        "k": k,
        "mean_length": sum(lengths) / len(lengths),
        "truncation_rate": sum(truncated) / len(truncated),
        "n_problems": len(correct),
    }


@torch.no_grad()
def heldout_divergence(
    student: Any,
    teacher: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    batch_size: int = 16,
    top_k: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Teacher-student divergence per token on the student's own samples for the prompts of `dataset` (`prompt`).

    The student samples one completion per prompt (temperature `temperature`, seeded as in `evaluate`); on every
    completion token t, EOS included, both models' next-token distributions q_θ(·|y<t) and p_T(·|y<t) give
    - `reverse_kl` = mean_t KL(q_θ ‖ p_T), the quantity on-policy distillation minimises (Agarwal et al., 2024);
    - `forward_kl` = mean_t KL(p_T ‖ q_θ), the teacher mass the student misses on its own prefixes;
    - `student_entropy`, `teacher_entropy`, `overlap_ratio`, `overlap_mass_student`, `overlap_mass_teacher` of
      `trl_opd.diagnostics.token_diagnostics` at `top_k`;
    all averaged over every completion token of every prompt (`n_tokens`; nats for KL and entropy), plus
    `n_problems`. Unlike the training diagnostics these are measured on student samples whatever the prefix source,
    so runs with different sources compare.
    """
    eos_ids = eos_token_ids(student, tokenizer)
    prompts = list(dataset["prompt"])
    totals = dict.fromkeys(("reverse_kl", "forward_kl", *HELDOUT_DIAGNOSTICS), 0.0)
    n_tokens = 0
    device = student.device
    with sampling_context([student, teacher], seed, tokenizer):
        for _, inputs in _prompt_batches(prompts, tokenizer, batch_size, device, "held-out KL", progress):
            output = student.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                eos_token_id=eos_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
            prompt_length = inputs["input_ids"].shape[1]
            completion = output[:, prompt_length:]
            counted = completion_mask(completion, eos_ids)
            mask = torch.cat([inputs["attention_mask"], counted.long()], dim=1)
            positions = slice(prompt_length - 1, -1)  # the logits that predict each completion token
            log_q = student(input_ids=output, attention_mask=mask).logits[:, positions].float() / temperature
            log_p = teacher(input_ids=output, attention_mask=mask).logits[:, positions].float() / temperature
            log_q, log_p = log_q.log_softmax(-1), log_p.log_softmax(-1)
            count = int(counted.sum())
            totals["reverse_kl"] += kl_divergence(log_q, log_p)[counted].sum().item()
            totals["forward_kl"] += kl_divergence(log_p, log_q)[counted].sum().item()
            stats = token_diagnostics(log_q[counted], log_p[counted], completion[counted], top_k)
            for name in HELDOUT_DIAGNOSTICS:
                totals[name] += stats.get(name, 0.0) * count
            n_tokens += count
    return {
        **{name: total / max(n_tokens, 1) for name, total in totals.items()},
        "n_tokens": n_tokens,
        "n_problems": len(prompts),
    }


def gap_recovery(teacher: float, before: float, after: float) -> float:
    """The share of the teacher-student gap that training closed: (after − before) / (teacher − before).

    1 means the student reached the teacher, 0 no change, negative a regression. When the teacher is not better than
    the student before training (teacher ≤ before) there is no gap to recover and the result is NaN.
    """
    gap = teacher - before
    return (after - before) / gap if gap > 0 else math.nan
