"""The toy world: problem generator, splits, SFT labels and training, and the cached teacher/student pair."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import TINY_PAIR

from trl_opd import toy
from trl_opd.toy import (
    ToyPairConfig,
    build_model,
    build_toy_pair,
    default_cache_dir,
    encode_pool,
    make_dataset,
    problem_pool,
    split_of,
    train_sft,
)


def test_make_dataset_is_deterministic_and_conversational():
    first = make_dataset(50, seed=3, split="train")
    assert first.to_dict() == make_dataset(50, seed=3, split="train").to_dict()
    assert first["prompt"] != make_dataset(50, seed=4, split="train")["prompt"]
    assert first.column_names == ["prompt", "completion", "answer"]
    assert first[0]["prompt"][0]["role"] == "user" and first[0]["completion"][0]["role"] == "assistant"
    assert len({row[0]["content"] for row in first["prompt"]}) == 50  # distinct problems


def test_splits_are_disjoint_and_cover_every_problem():
    train = {prompt for prompt, _, _ in problem_pool("train")}
    evaluation = {prompt for prompt, _, _ in problem_pool("eval")}
    assert not train & evaluation
    assert len(train) + len(evaluation) == sum(10**n for n in range(toy.MIN_OPERANDS, toy.MAX_OPERANDS + 1))
    assert len(evaluation) >= 1000  # room for the 200-problem held-out set and more
    assert all(split_of(prompt) == "eval" for prompt in evaluation)
    drawn = make_dataset(300, seed=0, split="eval")
    assert {row[0]["content"] for row in drawn["prompt"]} <= evaluation
    with pytest.raises(ValueError, match="cannot draw"):
        make_dataset(len(evaluation) + 1, split="eval")
    with pytest.raises(ValueError, match="split"):
        problem_pool("test")


def test_solutions_are_correct_step_by_step_arithmetic():
    for split in ("train", "eval"):
        for prompt, solution, answer in problem_pool(split):
            digits = [int(d) for d in re.fullmatch(r"What is (\d(?:\+\d)+)\?", prompt).group(1).split("+")]
            *steps, final = solution.split("\n")
            assert final == f"#### {answer}" and answer == sum(digits)
            total = digits[0]
            for step, digit in zip(steps, digits[1:], strict=True):
                assert step == f"{total}+{digit}={total + digit}"
                total += digit
    lengths = [len(solution) for _, solution, _ in problem_pool("train")]
    assert max(lengths) <= 40  # short completions keep CPU generation cheap


def test_sft_labels_cover_the_solution_and_its_end_of_turn(tokenizer):
    input_ids, lengths, labels = encode_pool("eval")
    prompt, solution, _ = problem_pool("eval")[0]
    assert tokenizer.decode(input_ids[0, : lengths[0]]) == tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": solution}], tokenize=False
    ).removesuffix("\n")
    assert tokenizer.decode(labels[0][labels[0] != -100]) == solution + tokenizer.eos_token
    assert (input_ids[0, lengths[0] :] == tokenizer.pad_token_id).all()


def test_train_sft_lowers_the_loss(tokenizer):
    model = build_model(tokenizer, hidden_size=32, num_layers=1, seed=0)
    input_ids, lengths, labels = encode_pool("eval")
    batch = {"input_ids": input_ids[:64], "labels": labels[:64]}

    def loss() -> float:
        with torch.no_grad():
            return model(**batch).loss.item()

    before = loss()
    trained = train_sft(model, steps=15, batch_size=16, learning_rate=1e-2, progress=False)
    assert trained is model and not model.training
    assert loss() < before - 1.0


def test_config_key_tracks_settings():
    assert ToyPairConfig().key() == ToyPairConfig().key()
    assert ToyPairConfig().key() != ToyPairConfig(student_steps=201).key()
    assert re.fullmatch(r"[0-9a-f]{16}", ToyPairConfig().key())


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_OPD_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "toy"
    monkeypatch.delenv("TRL_OPD_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "trl_opd", "toy")


def test_build_toy_pair_trains_once_then_loads(tmp_path, monkeypatch):
    calls = []
    real_train_sft = toy.train_sft

    def counting_train_sft(*args, **kwargs):
        calls.append(kwargs["steps"])
        return real_train_sft(*args, **kwargs)

    monkeypatch.setattr(toy, "train_sft", counting_train_sft)
    teacher, student, tokenizer = build_toy_pair(tmp_path, TINY_PAIR, progress=False)
    assert calls == [TINY_PAIR.teacher_steps, TINY_PAIR.student_steps]
    directory = tmp_path / TINY_PAIR.key()
    assert sorted(path.name for path in tmp_path.iterdir()) == [TINY_PAIR.key()]  # no staging folder left behind
    assert (directory / "teacher" / "config.json").exists() and (directory / "student" / "config.json").exists()
    assert teacher.config.vocab_size == student.config.vocab_size == len(tokenizer)
    assert (teacher.config.hidden_size, teacher.config.num_hidden_layers) == (24, 2)
    assert (student.config.hidden_size, student.config.num_hidden_layers) == (16, 1)
    assert not teacher.training and not student.training

    stamp = (directory / "settings.json").stat().st_mtime_ns
    teacher_again, student_again, _ = build_toy_pair(tmp_path, TINY_PAIR, progress=False)
    assert calls == [TINY_PAIR.teacher_steps, TINY_PAIR.student_steps]  # loaded, not retrained
    assert (directory / "settings.json").stat().st_mtime_ns == stamp
    for again, first in ((teacher_again, teacher), (student_again, student)):
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), first.state_dict().values()))

    build_toy_pair(tmp_path, ToyPairConfig(**{**TINY_PAIR.__dict__, "student_steps": 1}), progress=False)
    assert calls[2:] == [TINY_PAIR.teacher_steps, 1]  # changed settings: a new build
