"""`CollapseGuard` reacts to the truncation rate the trainer logs (random tiny students never emit EOS)."""

from __future__ import annotations

import pytest
from conftest import make_config, make_dataset

from trl_opd import OPDTrainer
from trl_opd.callbacks.collapse_guard import CollapseGuard


def run(student, teacher, tokenizer, tmp_path, guard, **overrides):
    trainer = OPDTrainer(
        model=student,
        teacher_model=teacher,
        args=make_config(tmp_path, max_completion_length=16, **overrides),
        train_dataset=make_dataset(),
        processing_class=tokenizer,
        callbacks=[guard],
    )
    with pytest.warns(UserWarning, match="CollapseGuard at step 1: truncation_rate=1.00 > 0.50"):
        trainer.train()
    return trainer


def test_shorten_halves_the_generation_length(student, teacher, tokenizer, tmp_path):
    trainer = run(student, teacher, tokenizer, tmp_path, CollapseGuard(action="shorten", min_length=4), max_steps=3)
    lengths = [entry["completions/max_length"] for entry in trainer.state.log_history if "loss" in entry]
    assert lengths == [16, 8, 4]
    assert trainer.args.max_completion_length == 4


def test_stop_saves_and_stops(student, teacher, tokenizer, tmp_path):
    guard = CollapseGuard(action="stop")
    trainer = run(student, teacher, tokenizer, tmp_path, guard, max_steps=5)
    assert trainer.state.global_step == 1 and guard.alarms == 1
    assert (tmp_path / "checkpoint-1" / "trainer_state.json").exists()


@pytest.mark.parametrize(
    "kwargs,match",
    [({"action": "halt"}, "action"), ({"max_truncation_rate": 2.0}, r"\[0, 1\]"), ({"shrink": 1.0}, "shrink")],
)
def test_bad_arguments_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CollapseGuard(**kwargs)
