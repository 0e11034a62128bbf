"""Prefix sources as pure functions: the mixed draw, dataset completions as tokens, dataset checks."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_dataset
from datasets import Dataset

from trl_opd.prefixes import dataset_completion_ids, draw_prefix_source
from trl_opd.validation import validate_prompt_dataset


def test_non_mixed_sources_are_returned_as_is():
    for source in ("student", "teacher", "dataset"):
        assert draw_prefix_source(source, "dataset", 0.5, seed=0, draw_index=3) == source


def test_mixed_draw_depends_only_on_seed_and_index():
    """Same (seed, index) → same source whatever the process-local RNG state: identical on every rank."""
    first = [draw_prefix_source("mixed", "teacher", 0.5, 7, i) for i in range(50)]
    random.seed(123)
    torch.manual_seed(123)
    second = [draw_prefix_source("mixed", "teacher", 0.5, 7, i) for i in range(50)]
    assert first == second
    assert set(first) == {"student", "teacher"}
    assert [draw_prefix_source("mixed", "teacher", 0.5, 8, i) for i in range(50)] != first


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.8, 1.0])
def test_mixed_draw_frequency_follows_the_fraction(fraction):
    draws = [draw_prefix_source("mixed", "dataset", fraction, 0, i) for i in range(4000)]
    share = draws.count("student") / len(draws)
    assert abs(share - fraction) < 0.03
    assert set(draws) <= {"student", "dataset"}


def prompt_ids(tokenizer, prompt):
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]


def test_conversational_completion_is_what_follows_the_generation_prompt(tokenizer):
    prompt = [{"role": "user", "content": "1+2?"}]
    completion = [{"role": "assistant", "content": "1+2=3"}]
    ids = dataset_completion_ids(
        tokenizer, prompt, completion, prompt_ids(tokenizer, prompt), [tokenizer.eos_token_id], None
    )
    assert tokenizer.decode(ids) == "1+2=3<|im_end|>"  # the template's trailing newline after EOS is cut
    assert ids[-1] == tokenizer.eos_token_id


def test_plain_completion_gets_eos_and_truncation(tokenizer):
    ids = dataset_completion_ids(
        tokenizer, "1+2?", " 3", tokenizer("1+2?")["input_ids"], [tokenizer.eos_token_id], None
    )
    assert tokenizer.decode(ids) == " 3<|im_end|>"
    cut = dataset_completion_ids(tokenizer, "1+2?", " 345", [], [tokenizer.eos_token_id], 2)
    assert tokenizer.decode(cut) == " 3"


def test_non_prefix_preserving_template_is_refused(tokenizer):
    prompt = [{"role": "user", "content": "1+2?"}]
    with pytest.raises(ValueError, match="prefix-preserving"):
        dataset_completion_ids(tokenizer, prompt, [{"role": "assistant", "content": "3"}], [0, 0, 0], [2], None)


def test_row_mixing_formats_is_refused(tokenizer):
    with pytest.raises(ValueError, match="both be conversational"):
        dataset_completion_ids(tokenizer, [{"role": "user", "content": "x"}], "3", [1], [2], None)


def test_dataset_checks_name_the_fix():
    good = make_dataset(4)
    validate_prompt_dataset(good, "train_dataset", needs_completion=True)
    with pytest.raises(ValueError, match="rename_column"):
        validate_prompt_dataset(good.rename_column("prompt", "question"), "train_dataset", needs_completion=False)
    with pytest.raises(ValueError, match="no `completion` column"):
        validate_prompt_dataset(good.remove_columns("completion"), "train_dataset", needs_completion=True)
    with pytest.raises(ValueError, match="empty"):
        validate_prompt_dataset(good.select([]), "train_dataset", needs_completion=False)
    with pytest.raises(ValueError, match="empty prompts"):
        validate_prompt_dataset(Dataset.from_dict({"prompt": ["a", ""]}), "eval_dataset", needs_completion=False)
