"""Interrupted + resumed runs reproduce the uninterrupted one; half-written checkpoints are never resumed from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_config, make_dataset
from transformers import TrainerCallback

from trl_opd import OPDTrainer
from trl_opd.checkpoints import last_complete_checkpoint, resolve_resume_checkpoint
from trl_opd.toy import build_model


class StopAfter(TrainerCallback):
    """Ends training after `step` optimizer steps, as a crash right after that step's checkpoint would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def trainer_for(tokenizer, output_dir, callbacks=(), n_prompts=16):
    args = make_config(
        output_dir,
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        prefix_source="mixed",
        off_policy_source="teacher",
        student_prefix_fraction=0.5,
        kl_direction="mixed",
        forward_kl_weight=0.3,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
    )
    return OPDTrainer(
        model=build_model(tokenizer, hidden_size=32, num_layers=1, seed=0),
        teacher_model=build_model(tokenizer, hidden_size=48, num_layers=2, seed=1),
        args=args,
        train_dataset=make_dataset(n_prompts),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


@pytest.mark.parametrize("n_prompts", [16, 8], ids=["resume-in-first-epoch", "resume-in-second-epoch"])
def test_resumed_run_reproduces_the_uninterrupted_loss_curve(tokenizer, tmp_path, n_prompts):
    """4 prompts per optimizer step: with 8 prompts, step 3 is in the second epoch, whose shuffle must be replayed."""
    straight = trainer_for(tokenizer, tmp_path / "straight", n_prompts=n_prompts)
    straight.train()

    interrupted = trainer_for(tokenizer, tmp_path / "resumed", callbacks=[StopAfter(3)], n_prompts=n_prompts)
    interrupted.train()
    assert interrupted.state.global_step == 3
    resumed = trainer_for(tokenizer, tmp_path / "resumed", n_prompts=n_prompts)
    resumed.train(resume_from_checkpoint=True)

    assert len(logged(straight, "loss")) == 6
    assert logged(resumed, "loss") == pytest.approx(logged(straight, "loss"), rel=1e-5, abs=1e-7)
    assert logged(resumed, "opd/student_prefix") == logged(straight, "opd/student_prefix")
    assert 0 < sum(logged(straight, "opd/student_prefix")) < 6  # the mixture really mixed


CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import build_tokenizer
from transformers import TrainerCallback
from test_resume import trainer_for

class Hang(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 4:
            time.sleep(600)

trainer_for(build_tokenizer(), {output!r}, callbacks=[Hang()]).train()
"""


def test_sigkill_after_a_checkpoint_then_resume(tokenizer, tmp_path):
    """A real process killed with SIGKILL mid-run resumes from its last checkpoint to the same curve."""
    output = tmp_path / "killed"
    script = CHILD.format(tests=str(Path(__file__).parent), output=str(output))
    log = tmp_path / "child.log"
    with log.open("w") as sink:
        child = subprocess.Popen([sys.executable, "-c", script], stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while last_complete_checkpoint(output) is None and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)  # let it run into step 4
    assert child.poll() is None, f"the training child exited early:\n{log.read_text()[-3000:]}"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert last_complete_checkpoint(output) == output / "checkpoint-3"

    resumed = trainer_for(tokenizer, output)
    resumed.train(resume_from_checkpoint=True)
    straight = trainer_for(tokenizer, tmp_path / "straight")
    straight.train()
    assert logged(resumed, "loss") == pytest.approx(logged(straight, "loss"), rel=1e-5, abs=1e-7)


def test_half_written_latest_checkpoint_is_skipped(tmp_path):
    for step, state in [(3, {"global_step": 3}), (6, None), (9, {"global_step": 2})]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(json.dumps(state))
    (tmp_path / "checkpoint-12").mkdir()
    (tmp_path / "checkpoint-12" / "trainer_state.json").write_text('{"global_step": 1')  # cut mid-write
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert resolve_resume_checkpoint(True, tmp_path) == str(tmp_path / "checkpoint-3")
    with pytest.raises(ValueError, match="newest complete one is .*checkpoint-3"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-12"), tmp_path)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_resume_checkpoint(True, tmp_path / "empty")
    assert resolve_resume_checkpoint(None, tmp_path) is None
