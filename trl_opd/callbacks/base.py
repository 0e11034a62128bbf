"""`OPDCallback`: what trl-opd's training-time controllers (schedules, length curriculum, EffOPD) share."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


class OPDCallback(TrainerCallback, ExportableState):
    """A `TrainerCallback` that steers `OPDTrainer` through its `args` and reports `opd/` metrics.

    The contract with `OPDTrainer`:

    - Knobs are changed by assigning to `args` (the trainer's own `OPDConfig`). The trainer reads the loss knobs at
      every loss computation and pushes `temperature`/`max_completion_length` into its generation settings before
      every generation batch. TRL generates once per gradient-accumulation window, at its first micro-batch, and
      `on_step_begin` runs just before it, so a value set there from `state.global_step` is what that step uses, on
      every rank alike.
    - `metrics(args)` is merged into every training log entry by `OPDTrainer.log`. (Mutating `logs` in `on_log` is
      too late: `Trainer.log` has already copied the entry into `state.log_history`, and the reporting integrations
      such as W&B run before user callbacks.)
    - `prepare(eval_dataset=..., resume_from_checkpoint=...)` is called by `OPDTrainer.train` before training: the
      trainer's `eval_dataset` is the default held-out set of the callbacks that sample (the curriculum, EffOPD's
      default score), and the checkpoint directory being resumed from holds files a callback saved there.
    - `state()` returns `{"args": JSON constructor arguments, "attributes": progress}`. On resume `OPDTrainer` sets
      the saved `attributes` on the instances the user passed, in place (matched by class name, in order), so
      constructor arguments that JSON cannot hold (score functions, prompt lists) are kept.
    """

    state_attributes: tuple[str, ...] = ()  # the instance attributes that `state()` saves and a resume restores

    def __init__(self) -> None:
        self.eval_dataset: Any = None
        self.resume_from_checkpoint: str | None = None

    def prepare(self, *, eval_dataset: Any, resume_from_checkpoint: str | None) -> None:
        """Take the trainer's `eval_dataset` (a `Dataset`, a dict of them, or None) and the checkpoint directory this
        `train()` call resumes from (None for a fresh start)."""
        self.eval_dataset, self.resume_from_checkpoint = eval_dataset, resume_from_checkpoint

    def metrics(self, args: Any) -> dict[str, float]:
        """The `opd/` values of the step just run, for the training log."""
        return {}

    def constructor_args(self) -> dict[str, Any]:
        """The JSON-serialisable constructor arguments, saved for reference (never used to rebuild the callback)."""
        return {}

    def state(self) -> dict[str, Any]:
        return {
            "args": self.constructor_args(),
            "attributes": {name: getattr(self, name) for name in self.state_attributes},
        }
