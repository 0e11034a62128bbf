"""`ScheduleCallback`: one scalar knob of `OPDConfig` as a function of the global step.

The paper mixes forward and reverse KL with a constant weight (docs/concepts.md, arXiv 2605.16826); schedules of that
weight, of GKD's student fraction λ and JSD β (§2), of the sampling temperature and of the top-k support size (§3) are
this package's extension.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerControl, TrainerState

from ..config import TOPK_SUPPORTS
from .base import OPDCallback

SHAPES = ("constant", "linear", "cosine", "step")
UNIT_KNOBS = ("forward_kl_weight", "student_prefix_fraction", "beta")
KNOBS = (*UNIT_KNOBS, "temperature", "loss_top_k")
# The setting a knob needs to have any effect: (config field, values under which the knob is read).
KNOB_EFFECT = {
    "forward_kl_weight": ("kl_direction", ("mixed",)),
    "beta": ("kl_direction", ("jsd",)),
    "student_prefix_fraction": ("prefix_source", ("mixed",)),
    "loss_top_k": ("loss_support", TOPK_SUPPORTS),
}


def schedule_value(shape: str, start: float, end: float, step: int, start_step: int, end_step: int) -> float:
    """The value of a schedule at `step`, with p = clip((step − start_step) / (end_step − start_step), 0, 1):

    - "constant": start;
    - "linear": start + (end − start)·p;
    - "cosine": end + (start − end)·(1 + cos(π·p))/2, a half cosine from start to end, flat at both ends;
    - "step": start while step < end_step, end from end_step on (`start_step` plays no role).
    """
    if shape == "constant":
        return start
    if shape == "step":
        return start if step < end_step else end
    progress = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    if shape == "linear":
        return start + (end - start) * progress
    return end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0


def _check_value(knob: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    if knob in UNIT_KNOBS and not 0.0 <= value <= 1.0:
        raise ValueError(f"`{knob}` is a weight/probability: `{name}` must be in [0, 1], got {value}.")
    if knob == "temperature" and value <= 0:
        raise ValueError(f"`temperature` must be > 0: `{name}` must be positive, got {value}.")
    if knob == "loss_top_k" and value < 1:
        raise ValueError(f"`loss_top_k` must be >= 1: `{name}` must be at least 1, got {value}.")


class ScheduleCallback(OPDCallback):
    """Drive one scalar knob of `OPDConfig` from `start` to `end` as a pure function of `state.global_step`.

    The knob is set at train begin and at the beginning of every optimizer step (before its generation batch), from
    `state.global_step` alone, so every rank sets the same value and a resumed run continues the schedule where it
    stopped. `loss_top_k` values are rounded to the nearest integer (halves up). The value used by each step is
    logged as `opd/<knob>`.

    Args:
        knob: `"forward_kl_weight"` (needs `kl_direction="mixed"`), `"student_prefix_fraction"` (needs
            `prefix_source="mixed"`), `"beta"` (needs `kl_direction="jsd"`), `"temperature"` (student sampling and
            loss temperature; also the teacher's while `teacher_temperature` is None) or `"loss_top_k"` (needs a
            top-k `loss_support`, and at most the vocabulary size).
        start, end: the values at `start_step` and from `end_step` on. Weights and fractions in [0, 1],
            temperature > 0, top-k ≥ 1. `"constant"` requires `end == start`.
        shape: `"constant"`, `"linear"`, `"cosine"` (half cosine, flat at both ends) or `"step"` (`start` before
            `end_step`, `end` from `end_step` on); see `schedule_value`.
        start_step, end_step: the ramp runs over global steps [start_step, end_step]; `end_step=None` is the last
            step of training (`state.max_steps`).

    Several schedules on different knobs can be combined. On resume the trainer restores stateful callbacks by class
    name and position, so pass them in the same order in every run (a schedule carries no progress of its own: its
    value is recomputed from the restored global step).

    Example:
        ```python
        # forward-heavy first, reverse-heavy at the end (needs kl_direction="mixed")
        ScheduleCallback("forward_kl_weight", 0.9, 0.1, shape="cosine")
        ```
    """

    def __init__(
        self,
        knob: str,
        start: float,
        end: float,
        shape: str = "linear",
        start_step: int = 0,
        end_step: int | None = None,
    ) -> None:
        super().__init__()
        if knob not in KNOBS:
            raise ValueError(f"`knob` must be one of {list(KNOBS)}, got {knob!r}.")
        if shape not in SHAPES:
            raise ValueError(f"`shape` must be one of {list(SHAPES)}, got {shape!r}.")
        _check_value(knob, "start", start)
        _check_value(knob, "end", end)
        if shape == "constant" and end != start:
            raise ValueError(f"A 'constant' schedule holds `start`; got start={start} and end={end}. Use end=start.")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"`start_step` must be an integer >= 0, got {start_step!r}.")
        if end_step is not None and (isinstance(end_step, bool) or not isinstance(end_step, int)):
            raise ValueError(f"`end_step` must be an integer or None (end of training), got {end_step!r}.")
        if end_step is not None and end_step <= start_step:
            raise ValueError(f"`end_step` ({end_step}) must be greater than `start_step` ({start_step}).")
        self.knob, self.start, self.end, self.shape = knob, start, end, shape
        self.start_step, self.end_step = start_step, end_step

    def constructor_args(self) -> dict[str, Any]:
        return {
            "knob": self.knob,
            "start": self.start,
            "end": self.end,
            "shape": self.shape,
            "start_step": self.start_step,
            "end_step": self.end_step,
        }

    def value_at(self, step: int, max_steps: int) -> float | int:
        """The knob's value during global step `step` of a run of `max_steps` steps."""
        value = schedule_value(self.shape, self.start, self.end, step, self.start_step, self._end_step(max_steps))
        return math.floor(value + 0.5) if self.knob == "loss_top_k" else float(value)

    def _end_step(self, max_steps: int) -> int:
        return max_steps if self.end_step is None else self.end_step

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, model=None, **kwargs) -> None:
        if self.knob in KNOB_EFFECT:
            field, values = KNOB_EFFECT[self.knob]
            if getattr(args, field) not in values:
                raise ValueError(
                    f"A schedule on `{self.knob}` has no effect with `{field}={getattr(args, field)!r}`: it is only "
                    f"read when `{field}` is one of {list(values)}."
                )
        if self.shape != "constant" and self._end_step(state.max_steps) <= self.start_step:
            raise ValueError(
                f"The '{self.shape}' schedule of `{self.knob}` ends at step {self._end_step(state.max_steps)} "
                f"(`end_step`, or `max_steps` when None) but starts at `start_step={self.start_step}`."
            )
        if self.knob == "loss_top_k" and model is not None:
            vocab_size = model.config.get_text_config().vocab_size
            if max(self.start, self.end) > vocab_size:
                raise ValueError(
                    f"The `loss_top_k` schedule reaches {max(self.start, self.end)}, above the vocabulary size "
                    f"({vocab_size})."
                )
        self._apply(args, state)

    def on_step_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        self._apply(args, state)

    def _apply(self, args: Any, state: TrainerState) -> None:
        setattr(args, self.knob, self.value_at(state.global_step, state.max_steps))

    def metrics(self, args: Any) -> dict[str, float]:
        return {f"opd/{self.knob}": float(getattr(args, self.knob))}
