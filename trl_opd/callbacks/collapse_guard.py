"""`CollapseGuard`: act when repetition or truncation rates show length inflation (Luo et al., arXiv 2604.08527)."""

from __future__ import annotations

import warnings
from typing import Any

from .base import OPDCallback

ACTIONS = ("warn", "stop", "shorten")


class CollapseGuard(OPDCallback):
    """Watches `opd/repetition_rate` and `opd/truncation_rate` in every training log and acts when one crosses its
    threshold: always a warning naming the step and the rates; then, by `action`,

    - "warn": nothing more;
    - "stop": save a checkpoint and stop training (resume later with other settings);
    - "shorten": multiply `max_completion_length` by `shrink` (not below `min_length`) from the next generation
      batch on. Do not combine with `EntropyGatedLengthCurriculum`, which also owns that knob.

    Luo et al. show OPD's length inflation as TruncRate and RepRate climbing together; both rates are computed by
    `OPDTrainer` on every generation batch (see `docs/diagnostics.md`).
    """

    state_attributes = ("alarms", "last_alarm_step")

    def __init__(
        self,
        max_repetition_rate: float = 0.5,
        max_truncation_rate: float = 0.5,
        action: str = "warn",
        shrink: float = 0.5,
        min_length: int = 16,
    ) -> None:
        super().__init__()
        if action not in ACTIONS:
            raise ValueError(f"`action` must be one of {list(ACTIONS)}, got {action!r}.")
        rates = {"max_repetition_rate": max_repetition_rate, "max_truncation_rate": max_truncation_rate}
        for name, value in rates.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` is a share of completions and must be in [0, 1], got {value}.")
        if not 0.0 < shrink < 1.0:
            raise ValueError(f"`shrink` must be in (0, 1) so the length decreases, got {shrink}.")
        if min_length < 1:
            raise ValueError(f"`min_length` must be >= 1, got {min_length}.")
        self.max_repetition_rate, self.max_truncation_rate = max_repetition_rate, max_truncation_rate
        self.action, self.shrink, self.min_length = action, shrink, min_length
        self.alarms = 0
        self.last_alarm_step = -1

    def constructor_args(self) -> dict[str, Any]:
        return {
            "max_repetition_rate": self.max_repetition_rate,
            "max_truncation_rate": self.max_truncation_rate,
            "action": self.action,
            "shrink": self.shrink,
            "min_length": self.min_length,
        }

    def metrics(self, args: Any) -> dict[str, float]:
        return {"opd/collapse_alarms": float(self.alarms)}

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        limits = {"repetition_rate": self.max_repetition_rate, "truncation_rate": self.max_truncation_rate}
        breached = {
            name: logs[f"opd/{name}"]
            for name, limit in limits.items()
            if logs.get(f"opd/{name}") is not None and logs[f"opd/{name}"] > limit
        }
        if not breached or state.global_step == self.last_alarm_step:
            return
        self.alarms += 1
        self.last_alarm_step = state.global_step
        rates = ", ".join(f"{name}={value:.2f} > {limits[name]:.2f}" for name, value in breached.items())
        message = f"CollapseGuard at step {state.global_step}: {rates} (length inflation, Luo et al.)."
        if self.action == "stop":
            control.should_save = True
            control.should_training_stop = True
            message += " Saving a checkpoint and stopping."
        elif self.action == "shorten":
            length = max(self.min_length, int(args.max_completion_length * self.shrink))
            message += f" max_completion_length {args.max_completion_length} -> {length}."
            args.max_completion_length = length
        warnings.warn(message, stacklevel=2)
