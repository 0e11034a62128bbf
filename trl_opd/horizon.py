"""The toy world with a horizon: long step-by-step solutions where an early slip derails the rest.

A problem asks to add a digit to a number repeatedly until the total passes a bound ("Add 7 to 38 until over 120."):

    38+7=45
    45+7=52
    ...
    115+7=122
    #### 122

Each line needs only the previous line and the prompt, so the world is cheap for tiny models, but a solution has 8 to
16 such lines (about 100 tokens) and one wrong digit changes every later line and the answer. Length is the student's
to get wrong as well: it decides when to stop, so it can stop early, overrun the bound or loop until truncated.

The teacher is also trained on solutions with *injected slips followed by explicit corrections*: a wrong line, then
" no", then the same line redone ("45+7=53 no\\n45+7=52"), and one step past the bound, then " no" and the answer.
The slipped characters are masked out of its loss, so it learns to recover from slips without learning to make them.
The gold solutions never show a slip, so a student trained on gold or teacher text never sees one either; only its
own samples (on-policy prefixes) show it its slips together with the teacher's recovery (the DAgger argument). The
student is trained on gold solutions only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import torch
from datasets import Dataset

from .toy import SPLITS, ToyPairConfig, build_tokenizer, draw_dataset, split_of

MIN_START, MAX_START = 10, 99
MIN_ADD, MAX_ADD = 2, 9
MIN_STEPS, MAX_STEPS = 8, 14
MAX_TOTAL = 99  # two-digit totals: every line "xx+a=yy" has the same length
CORRECTION = " no"  # what follows a slipped line before it is redone
SLIP_KINDS = ("result", "operand", "carry", "overrun")


def prompt_of(start: int, add: int, bound: int) -> str:
    return f"Add {add} to {start} until over {bound}."


def solve(start: int, add: int, bound: int) -> tuple[str, int]:
    """The gold solution (one `x+a=y` line per addition until y > bound, then `#### y`) and the answer y."""
    lines, total = [], start
    while total <= bound:
        lines.append(f"{total}+{add}={total + add}")
        total += add
    lines.append(f"#### {total}")
    return "\n".join(lines), total


@lru_cache(maxsize=len(SPLITS))
def problem_pool(split: str) -> tuple[tuple[str, str, int], ...]:
    """Every problem of `split` as (prompt, solution, answer), in a fixed order: each start, added digit, number of
    steps (`MIN_STEPS` to `MAX_STEPS`) and bound that gives that number of steps is enumerated (~39,000 problems,
    about a tenth of them in "eval")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    pool = []
    for start in range(MIN_START, MAX_START + 1):
        for add in range(MIN_ADD, MAX_ADD + 1):
            for steps in range(MIN_STEPS, MAX_STEPS + 1):
                if start + steps * add > MAX_TOTAL:
                    break
                for slack in range(add):  # bound in [start + (steps-1)·add, start + steps·add - 1]: exactly `steps`
                    bound = start + (steps - 1) * add + slack
                    prompt = prompt_of(start, add, bound)
                    if split_of(prompt) == split:
                        pool.append((prompt, *solve(start, add, bound)))
    return tuple(pool)


def make_dataset(n: int, seed: int = 0, split: str = "train") -> Dataset:
    """`n` distinct problems of `split`, drawn reproducibly with `seed`, as a conversational prompt-completion dataset
    with an `answer` column (the layout of `trl_opd.toy.make_dataset`)."""
    return draw_dataset(problem_pool(split), n, seed, split)


def parse_prompt(prompt: str) -> tuple[int, int, int]:
    """(start, added digit, bound) of a prompt written by `prompt_of`."""
    words = prompt.removesuffix(".").split()
    return int(words[3]), int(words[1]), int(words[6])


def _wrong(value: int, rng: random.Random) -> int:
    """A plausible wrong version of `value`: off by one or two, or by ten (a carry gone wrong)."""
    while True:
        wrong = value + rng.choice((-2, -1, 1, 2, -10, 10))
        if wrong >= 0 and wrong != value:
            return wrong


def slipped_solution(start: int, add: int, bound: int, rng: random.Random, slip_rate: float):
    """A solution with slips injected, each followed by `CORRECTION` and the step redone, and the character spans of
    the slipped text (to be masked out of the loss): (text, [(begin, end), ...]).

    Each line slips with probability `slip_rate`, in its result ("45+7=53"), its added digit ("45+6=51") or the
    total it carries from the line before ("54+7=61"); the last line overruns the bound (one step too many) with the
    same probability. At least one slip is injected.
    """
    text, spans, total, slipped = "", [], start, False
    while True:
        lines_left = total <= bound
        if not lines_left:
            force = not slipped
            if force or rng.random() < slip_rate:  # one step too many, then back to the answer
                begin = len(text)
                text += f"{total}+{add}={total + add}"
                spans.append((begin, len(text)))
                text += CORRECTION + "\n"
            text += f"#### {total}"
            return text, spans
        if rng.random() < slip_rate:
            kind = rng.choice(SLIP_KINDS[:3])
            shown_total, shown_add, shown_result = total, add, total + add
            if kind == "result":
                shown_result = _wrong(total + add, rng)
            elif kind == "operand":
                shown_add = rng.choice([d for d in range(1, 10) if d != add])
                shown_result = total + shown_add
            else:
                shown_total = _wrong(total, rng)
                shown_result = shown_total + add
            line = f"{shown_total}+{shown_add}={shown_result}"
            # Mask from the first wrong character to the end of the line.
            correct = f"{total}+{add}={total + add}"
            first = next(i for i, (a, b) in enumerate(zip(line, correct + " " * len(line))) if a != b)
            spans.append((len(text) + first, len(text) + len(line)))
            text += line + CORRECTION + "\n"
            slipped = True
        text += f"{total}+{add}={total + add}\n"
        total += add


def encode(texts_by_prompt: list[tuple[str, str, list[tuple[int, int]]]]):
    """(prompt, solution, masked spans) triples in chat format, tokenized: right-padded ids, lengths, and labels that
    keep the solution and its `<|im_end|>` except the masked spans (the layout of `trl_opd.toy.encode_pool`)."""
    tokenizer = build_tokenizer()
    conversations = [[{"role": "user", "content": prompt}] for prompt, _, _ in texts_by_prompt]
    prompts = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
    texts = [prompt + solution + tokenizer.eos_token for prompt, (_, solution, _) in zip(prompts, texts_by_prompt)]
    encoded = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"].bool()
    prompt_lengths = tokenizer(prompts, add_special_tokens=False, return_length=True)["length"]
    keep = attention_mask.clone()
    for row, (length, (_, _, spans)) in enumerate(zip(prompt_lengths, texts_by_prompt)):
        keep[row, :length] = False  # the solution has one token per character, the prompt's template does not
        for begin, end in spans:
            keep[row, length + begin : length + end] = False
    return input_ids, attention_mask.sum(dim=1), input_ids.masked_fill(~keep, -100)


@lru_cache(maxsize=4)
def training_texts(split: str, slip_fraction: float, slip_rate: float, seed: int = 0):
    """The `split` problems as (prompt, solution, masked spans): a `slip_fraction` share of them (drawn with `seed`)
    with slips and corrections (`slipped_solution` at `slip_rate`), the rest gold."""
    rng = random.Random(seed)
    rows = []
    for prompt, solution, _ in problem_pool(split):
        if rng.random() < slip_fraction:
            rows.append((prompt, *slipped_solution(*parse_prompt(prompt), rng, slip_rate)))
        else:
            rows.append((prompt, solution, []))
    return tuple(rows)


@dataclass(frozen=True)
class HorizonPairConfig(ToyPairConfig):
    """The horizon world's pair (`trl_opd.toy.build_toy_pair(cache_dir, HorizonPairConfig())`): a 3-layer teacher
    trained on gold solutions and, for a `teacher_slip_fraction` share of problems, on solutions with slips and
    corrections (`slipped_solution` at `teacher_slip_rate`); a 2-layer, narrower student on gold solutions only,
    for fewer steps. Small batches and a high learning rate: on two CPU cores the number of updates, not the batch,
    is what the build's time budget buys."""

    teacher_hidden_size: int = 96
    teacher_num_layers: int = 3
    teacher_steps: int = 700
    student_hidden_size: int = 64
    student_num_layers: int = 2
    student_steps: int = 300
    batch_size: int = 16
    learning_rate: float = 5e-3
    teacher_slip_fraction: float = 0.5
    teacher_slip_rate: float = 0.15

    def training_data(self, role: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fraction = self.teacher_slip_fraction if role == "teacher" else 0.0
        return _encoded(fraction, self.teacher_slip_rate)


@lru_cache(maxsize=2)
def _encoded(slip_fraction: float, slip_rate: float):
    return encode(list(training_texts("train", slip_fraction, slip_rate)))
