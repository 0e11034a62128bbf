"""The toy world with a horizon: long step-by-step solutions where an early slip derails the rest.

A problem asks to add a digit to a number a given number of times ("Add 7 to 38, 8 times."); the solution writes one
line per addition, each led by the number of additions still to do, then the answer:

    8: 38+7=45
    7: 45+7=52
    ...
    1: 87+7=94
    #### 94

Each line needs only the line before it (count down by one, carry the total, add the digit), so the world is cheap for
tiny models, but a solution has 6 to 14 such lines (73 to 194 tokens, 119 on average) and one wrong digit changes
every later line and the answer. Length is the student's to get wrong as well: it stops after the line counted 1, so
a slipped count stops it early or makes it run on (and loop until truncated).

The teacher is also trained on solutions with *injected slips followed by explicit corrections*: a line cut right
after its first wrong digit, then " no", then the line redone ("7: 45+7=53 no\n7: 45+7=52", or "7: 44 no\n7: 45+7=52"
for a slip in the total). The wrong digit is masked out of its loss, so it learns to notice a slip at the next token
and recover without learning to make slips. The gold solutions never show a slip, so a student trained on
gold or teacher text never sees one either; only its own samples (on-policy prefixes) show it its slips together with
the teacher's recovery (the DAgger argument). The student is trained on gold solutions only.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from .evaluation import evaluate
from .toy import SPLITS, ToyPairConfig, draw_dataset, encode_solutions, split_of

MIN_START, MAX_START = 10, 99
MIN_ADD, MAX_ADD = 2, 9
MIN_STEPS, MAX_STEPS = 6, 14
MAX_TOTAL = 149
CORRECTION = " no"  # what follows a slipped line before it is redone
SLIP_KINDS = ("left", "total", "add", "result")  # the value of a line that a slip gets wrong
STOP_CHECK_PROBLEMS, STOP_CHECK_FROM = 128, 400  # the student's measured stop (`HorizonPairConfig.stop_rule`)
DOUBT_SHARE = 0.25  # a correct line is followed by a (masked) CORRECTION at this share of the slip rate


def prompt_of(start: int, add: int, steps: int) -> str:
    return f"Add {add} to {start}, {steps} times."


def line_of(left: int, total: int, add: int, result: int) -> str:
    """One line: the additions still to do (this one included), then the addition."""
    return f"{left}: {total}+{add}={result}"


def solve(start: int, add: int, steps: int) -> tuple[str, int]:
    """The gold solution (one line per addition, counted down from `steps` to 1, then `#### total`) and the total."""
    lines, total = [], start
    for left in range(steps, 0, -1):
        lines.append(line_of(left, total, add, total + add))
        total += add
    lines.append(f"#### {total}")
    return "\n".join(lines), total


@lru_cache(maxsize=len(SPLITS))
def problem_pool(split: str) -> tuple[tuple[str, str, int], ...]:
    """Every problem of `split` as (prompt, solution, answer), in a fixed order: each start, added digit and number of
    additions (`MIN_STEPS` to `MAX_STEPS`) that keeps every total within `MAX_TOTAL` is enumerated (5,487 problems,
    about a tenth of them in "eval")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    pool = []
    for start in range(MIN_START, MAX_START + 1):
        for add in range(MIN_ADD, MAX_ADD + 1):
            for steps in range(MIN_STEPS, MAX_STEPS + 1):
                if start + steps * add > MAX_TOTAL:
                    break
                prompt = prompt_of(start, add, steps)
                if split_of(prompt) == split:
                    pool.append((prompt, *solve(start, add, steps)))
    return tuple(pool)


def make_dataset(n: int, seed: int = 0, split: str = "train") -> Dataset:
    """`n` distinct problems of `split`, drawn reproducibly with `seed`, as a conversational prompt-completion dataset
    with an `answer` column (the layout of `trl_opd.toy.make_dataset`)."""
    return draw_dataset(problem_pool(split), n, seed, split)


def parse_prompt(prompt: str) -> tuple[int, int, int]:
    """(start, added digit, number of additions) of a prompt written by `prompt_of`."""
    words = prompt.removesuffix(" times.").replace(",", "").split()
    return int(words[3]), int(words[1]), int(words[4])


def _other(value: int, rng: random.Random) -> int:
    """`value` with one of its digits replaced by another digit (a sampling slip), never a leading zero."""
    digits = list(str(value))
    i = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[i] and not (d == "0" and i == 0 and len(digits) > 1)]
    digits[i] = rng.choice(choices)
    return int("".join(digits))


def slipped_solution(start: int, add: int, steps: int, rng: random.Random, slip_rate: float):
    """A solution with slips injected, each followed by `CORRECTION` and the line redone, and the character spans of
    the slipped text (to be masked out of the loss): (text, [(begin, end), ...]).

    Each line slips with probability `slip_rate` (at least one line does): one of its values (`SLIP_KINDS`) gets one
    wrong digit, the line is cut right after it, and `CORRECTION` follows ("7: 45+7=53 no", "7: 44 no"). A correct
    line is doubted with probability `slip_rate * DOUBT_SHARE`: `CORRECTION` follows the whole line, masked, and the
    line is written again, so that a sampled false alarm (the teacher's own or a student's) is followed by the right
    line rather than derailing.
    """
    text, spans, total = "", [], start
    forced = rng.randrange(steps)
    for index, left in enumerate(range(steps, 0, -1)):
        values = {"left": left, "total": total, "add": add, "result": total + add}
        correct = line_of(**values)
        if index == forced or rng.random() < slip_rate:
            kind = rng.choice(SLIP_KINDS)
            line = line_of(**{**values, kind: _other(values[kind], rng)})
            first = next(i for i, (a, b) in enumerate(zip(line, correct)) if a != b)
            spans.append((len(text) + first, len(text) + first + 1))
            text += line[: first + 1] + CORRECTION + "\n"
        elif rng.random() < slip_rate * DOUBT_SHARE:
            spans.append((len(text) + len(correct), len(text) + len(correct) + len(CORRECTION)))
            text += correct + CORRECTION + "\n"
        text += correct + "\n"
        total += add
    return text + f"#### {total}", spans


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
    is what the build's time budget buys.

    With the defaults the teacher solves every eval problem greedily and ~99% at temperature 1 (it notices and redoes
    its own sampled slips). The student would reach ~95% too with 1,000 steps, but its SFT ends once it solves half of
    a fixed set of train problems at temperature 1 (`stop_rule`, ~650 steps): inside its sharp rise (600 steps: ~40%,
    700: ~75%), whose timing moves with the seed, so a measured stop rather than a step count fixes where every seed
    starts. Never shown a slip, it is derailed by its own sampled wrong digits: Avg@4 0.50-0.55 on the eval split.
    """

    teacher_hidden_size: int = 96
    teacher_num_layers: int = 3
    teacher_steps: int = 1000
    student_hidden_size: int = 64
    student_num_layers: int = 2
    student_steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 5e-3
    teacher_slip_fraction: float = 0.5
    teacher_slip_rate: float = 0.15
    student_target_accuracy: float | None = 0.5
    data_version: int = 2  # bump when the world's data change, so that cached pairs are rebuilt

    def training_data(self, role: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fraction = self.teacher_slip_fraction if role == "teacher" else 0.0
        return _encoded(fraction, self.teacher_slip_rate)

    def stop_rule(
        self, role: str, tokenizer: PreTrainedTokenizerFast
    ) -> Callable[[int, Qwen2ForCausalLM], bool] | None:
        """The student's SFT ends once it solves `student_target_accuracy` of `STOP_CHECK_PROBLEMS` train problems, one
        sample each at temperature 1 (checked from step `STOP_CHECK_FROM` on): its sharp rise comes earlier or later
        with the seed, and a measured stop gives every seed the same starting point."""
        if role != "student" or self.student_target_accuracy is None:
            return None
        problems = make_dataset(STOP_CHECK_PROBLEMS, seed=self.student_seed, split="train")

        def reached(step: int, model: Qwen2ForCausalLM) -> bool:
            if step < STOP_CHECK_FROM:
                return False
            result = evaluate(model, tokenizer, problems, max_new_tokens=256, seed=step, progress=False)
            return result["accuracy"] >= self.student_target_accuracy

        return reached


@lru_cache(maxsize=2)
def _encoded(slip_fraction: float, slip_rate: float):
    return encode_solutions(training_texts("train", slip_fraction, slip_rate))
