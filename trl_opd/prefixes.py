"""Where the completions come from: the prefix source of a generation batch, and dataset completions as tokens.

The trainer samples student prefixes with TRL's own generation (HF `generate` or vLLM) and teacher prefixes with the
same code run on the teacher; this module holds the pieces that are pure functions of their inputs: the seeded
per-batch draw of `prefix_source="mixed"`, the tokenisation of a dataset's `completion` column, and the dataset checks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase


def draw_prefix_source(
    prefix_source: str, off_policy_source: str, student_prefix_fraction: float, seed: int, draw_index: int
) -> str:
    """The source of one generation batch: 'student', 'teacher' or 'dataset'.

    Under "mixed", the student is drawn with probability `student_prefix_fraction` (GKD's λ) from a generator seeded
    by `(seed, draw_index)` alone: every rank draws the same source without communicating, and a run resumed at the
    same step draws what the uninterrupted run drew.
    """
    if prefix_source != "mixed":
        return prefix_source
    if random.Random(f"trl-opd/{seed}/{draw_index}").random() < student_prefix_fraction:
        return "student"
    return off_policy_source


def _is_conversational(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def dataset_completion_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[dict[str, Any]],
    completion: str | list[dict[str, Any]],
    prompt_ids: Sequence[int],
    eos_token_ids: Sequence[int],
    max_length: int | None,
    **chat_template_kwargs: Any,
) -> list[int]:
    """Token ids of a dataset completion, as the model would have generated them after `prompt_ids`.

    Conversational rows render `prompt + completion` with the chat template and keep what follows the prompt's own
    rendering (`add_generation_prompt=True`) up to and including the first EOS, which requires a prefix-preserving
    template. Plain-text rows tokenise the completion without special tokens and append the EOS. Both are cut to
    `max_length`, like generation (a cut completion has no EOS).
    """
    if _is_conversational(prompt) != _is_conversational(completion):
        raise ValueError(
            "A row mixes formats: `prompt` and `completion` must both be conversational (lists of messages) or both "
            "plain strings."
        )
    if _is_conversational(prompt):
        full_ids = tokenizer.apply_chat_template(
            list(prompt) + list(completion), tokenize=True, return_dict=True, **chat_template_kwargs
        )["input_ids"]
        if list(full_ids[: len(prompt_ids)]) != list(prompt_ids):
            raise ValueError(
                "The chat template renders the prompt differently once the completion follows it, so the dataset "
                "completion cannot be cut out of the conversation. Use a prefix-preserving chat template, or give "
                "plain-text `prompt`/`completion` columns."
            )
        ids = list(full_ids[len(prompt_ids) :])
        ends = [i for i, token in enumerate(ids) if token in eos_token_ids]
        if ends:
            ids = ids[: ends[0] + 1]
    else:
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos_token_ids[0]]
    return ids if max_length is None else ids[:max_length]


def validate_prompt_dataset(dataset: Dataset | IterableDataset | None, name: str, needs_completion: bool) -> None:
    """Fail fast on a dataset the trainer cannot use, with the fix in the message."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for key, split in dataset.items():
            validate_prompt_dataset(split, f"{name}[{key!r}]", needs_completion)
        return
    columns = dataset.column_names or []
    if "prompt" not in columns:
        raise ValueError(
            f"`{name}` has no `prompt` column (columns: {columns}). Rename the column holding the prompts, e.g. "
            f"`{name} = {name}.rename_column('question', 'prompt')`."
        )
    if needs_completion and "completion" not in columns:
        raise ValueError(
            f"`prefix_source` uses dataset completions, but `{name}` has no `completion` column (columns: "
            f"{columns}). Add one (gold solutions, as in TRL's prompt-completion format), or use "
            "`prefix_source='student'`/'teacher' (or `off_policy_source='teacher'` under 'mixed')."
        )
    if not isinstance(dataset, Dataset):
        return
    if len(dataset) == 0:
        raise ValueError(f"`{name}` is empty: give it at least one row with a `prompt`.")
    if any(not prompt for prompt in dataset["prompt"]):
        raise ValueError(f"`{name}` has empty prompts; drop them, e.g. `{name}.filter(lambda row: row['prompt'])`.")
