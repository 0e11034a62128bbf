"""The toy world: problem generator, splits, SFT labels and training, and the cached teacher/student pair."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from conftest import TINY_PAIR

from trl_opd import horizon, toy
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
    trained, steps = train_sft(model, steps=15, batch_size=16, learning_rate=1e-2, progress=False)
    assert trained is model and not model.training and steps == 15
    assert loss() < before - 1.0


def test_train_sft_stops_when_its_rule_says_so_and_reports_the_steps(tokenizer):
    model = build_model(tokenizer, hidden_size=16, num_layers=1, seed=0)
    asked = []

    def until(step: int, model) -> bool:
        asked.append((step, model.training))
        return step >= 10

    trained, steps = train_sft(model, steps=30, batch_size=4, learning_rate=1e-2, until=until, check_every=5)
    assert steps == 10 and asked == [(5, False), (10, False)] and not trained.training
    _, steps = train_sft(model, steps=12, batch_size=4, learning_rate=1e-2, until=lambda *_: False, check_every=5)
    assert steps == 12


def test_horizon_student_stops_at_its_measured_accuracy(tokenizer, monkeypatch):
    config = horizon.HorizonPairConfig()
    assert config.stop_rule("teacher", tokenizer) is None
    assert horizon.HorizonPairConfig(student_target_accuracy=None).stop_rule("student", tokenizer) is None
    measured = []

    def fake_evaluate(model, tokenizer, problems, **kwargs):
        measured.append(len(problems))
        return {"accuracy": 0.49 if len(measured) == 1 else 0.5}

    monkeypatch.setattr(horizon, "evaluate", fake_evaluate)
    reached = config.stop_rule("student", tokenizer)
    assert not reached(horizon.STOP_CHECK_FROM - 1, None) and measured == []  # too early: not even measured
    assert not reached(horizon.STOP_CHECK_FROM, None) and reached(horizon.STOP_CHECK_FROM + 50, None)
    assert measured == [horizon.STOP_CHECK_PROBLEMS] * 2


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
    settings = json.loads((directory / "settings.json").read_text())
    assert settings["teacher_steps_taken"] == TINY_PAIR.teacher_steps
    assert settings["student_steps_taken"] == TINY_PAIR.student_steps

    stamp = (directory / "settings.json").stat().st_mtime_ns
    teacher_again, student_again, _ = build_toy_pair(tmp_path, TINY_PAIR, progress=False)
    assert calls == [TINY_PAIR.teacher_steps, TINY_PAIR.student_steps]  # loaded, not retrained
    assert (directory / "settings.json").stat().st_mtime_ns == stamp
    for again, first in ((teacher_again, teacher), (student_again, student)):
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), first.state_dict().values()))

    build_toy_pair(tmp_path, ToyPairConfig(**{**TINY_PAIR.__dict__, "student_steps": 1}), progress=False)
    assert calls[2:] == [TINY_PAIR.teacher_steps, 1]  # changed settings: a new build


# The horizon world (trl_opd.horizon): long solutions, slips and their corrections.


def _replay(prompt: str, solution: str) -> tuple[int, int, int, list[str]]:
    """(start, added digit, additions) of `prompt` and the lines of `solution`, with the prompt's format checked."""
    start, add, steps = (int(n) for n in re.fullmatch(r"Add (\d) to (\d+), (\d+) times\.", prompt).group(2, 1, 3))
    return start, add, steps, solution.split("\n")


def test_horizon_solutions_are_long_chains_counted_down_to_the_answer():
    lengths = []
    for split in ("train", "eval"):
        for prompt, solution, answer in horizon.problem_pool(split)[::7]:
            start, add, steps, lines = _replay(prompt, solution)
            *written, final = lines
            assert final == f"#### {answer}"
            assert horizon.MIN_STEPS <= len(written) == steps <= horizon.MAX_STEPS
            total = start
            for left, line in zip(range(steps, 0, -1), written):
                assert line == f"{left}: {total}+{add}={total + add}"
                total += add
            assert total == answer <= horizon.MAX_TOTAL
            lengths.append(len(solution))
    assert sum(lengths) / len(lengths) >= 100 and max(lengths) <= 200  # a horizon of ~100+ tokens, bounded


def test_horizon_splits_are_disjoint_deterministic_and_drawn_reproducibly():
    train = {prompt for prompt, _, _ in horizon.problem_pool("train")}
    evaluation = {prompt for prompt, _, _ in horizon.problem_pool("eval")}
    assert not train & evaluation and len(evaluation) >= 500 and len(train) >= 4500
    assert all(horizon.split_of(prompt) == "eval" for prompt in evaluation)
    first = horizon.make_dataset(40, seed=3, split="eval")
    assert first.to_dict() == horizon.make_dataset(40, seed=3, split="eval").to_dict()
    assert {row[0]["content"] for row in first["prompt"]} <= evaluation
    assert first.column_names == ["prompt", "completion", "answer"]
    with pytest.raises(ValueError, match="cannot draw"):
        horizon.make_dataset(len(evaluation) + 1, split="eval")


def test_horizon_slips_are_cut_at_the_wrong_digit_masked_and_followed_by_the_redone_line():
    rng = random.Random(0)
    kinds, doubts = set(), 0
    for prompt, gold, answer in horizon.problem_pool("train")[:300]:
        start, add, steps, _ = _replay(prompt, gold)
        text, spans = horizon.slipped_solution(start, add, steps, rng, slip_rate=0.2)
        assert spans and text.endswith(f"#### {answer}")
        masked = iter(spans)
        total, left, offset = start, steps, 0
        for line in text.split("\n")[:-1]:
            correct = f"{left}: {total}+{add}={total + add}"
            if line == correct + horizon.CORRECTION:  # a doubted correct line: only the correction is masked
                doubts += 1
                assert next(masked) == (offset + len(correct), offset + len(line))
            elif line.endswith(horizon.CORRECTION):  # a slip: right up to one wrong digit, which alone is masked
                shown = line.removesuffix(horizon.CORRECTION)
                assert correct.startswith(shown[:-1]) and shown[-1] != correct[len(shown) - 1]
                assert next(masked) == (offset + len(shown) - 1, offset + len(shown))
                kinds.add(horizon.SLIP_KINDS[len(re.findall(r"\d+", shown)) - 1])  # the value of the wrong digit
            else:  # every other line is the gold step: a slip never changes what follows its correction
                assert line == correct
                total, left = total + add, left - 1
            offset += len(line) + 1
        assert next(masked, None) is None and total == answer and left == 0
    assert kinds == set(horizon.SLIP_KINDS) and doubts > 0


def test_horizon_teacher_data_masks_the_slips_and_the_student_sees_gold_only(tokenizer):
    config = horizon.HorizonPairConfig()
    texts = horizon.training_texts("train", config.teacher_slip_fraction, config.teacher_slip_rate)
    assert texts == horizon.training_texts("train", config.teacher_slip_fraction, config.teacher_slip_rate)
    slipped = [row for row in texts if row[2]]
    assert 0.4 < len(slipped) / len(texts) < 0.6
    input_ids, lengths, labels = toy.encode_solutions(slipped[:20])
    for row, (_, text, spans) in enumerate(slipped[:20]):
        trained = tokenizer.decode(labels[row][labels[row] != -100])
        expected = "".join(text[end:begin] for (_, end), (begin, _) in zip([(0, 0), *spans], [*spans, (len(text), 0)]))
        assert trained == expected + tokenizer.eos_token  # everything but the slipped characters
        assert horizon.CORRECTION in trained
