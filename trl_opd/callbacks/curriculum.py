"""`EntropyGatedLengthCurriculum`: a ladder of completion lengths climbed only while the student keeps its entropy.

docs/concepts.md (Decoupling KL and Trajectories, arXiv 2605.16826): train at lengths L_0 < L_1 < …; move from L_m to
L_{m+1} only if the student's mean per-token predictive entropy on held-out prompts H_m ≥ H_min, otherwise stay.
The paper publishes neither H_min nor the ladder; `min_entropy="0.8x"` sets H_min relative to the entropy measured
before training (see `docs/callbacks.md` for how to choose it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from transformers import TrainerControl, TrainerState

from ..rollouts import tokenize_prompts, tokenizer_of
from .base import OPDCallback
from .heldout import held_out_columns, sampled_entropy, sum_over_processes

RELATIVE_GATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*x\s*$")


def parse_min_entropy(min_entropy: float | str) -> tuple[float, bool]:
    """(value, relative): a float ≥ 0 is an absolute gate in nats; "0.8x" is 0.8 × the entropy before training."""
    if isinstance(min_entropy, str):
        match = RELATIVE_GATE.match(min_entropy)
        if match is None:
            raise ValueError(
                f"`min_entropy` must be a number of nats ≥ 0 or a string like '0.8x' (0.8 × the held-out entropy "
                f"measured before training), got {min_entropy!r}."
            )
        return float(match.group(1)), True
    if isinstance(min_entropy, bool) or not isinstance(min_entropy, (int, float)) or not min_entropy >= 0:
        raise ValueError(f"`min_entropy` must be a number of nats ≥ 0 or a string like '0.8x', got {min_entropy!r}.")
    return float(min_entropy), False


class EntropyGatedLengthCurriculum(OPDCallback):
    """Set `args.max_completion_length` from a ladder of lengths, advancing only while the held-out entropy holds.

    At global steps k·`check_every_steps` (k ≥ 1), if the current stage is at least `min_steps_per_stage` steps old
    and not the last one, the student samples one completion (at the stage's length, with the rollouts' sampling
    settings, seeded by `args.seed`, without gradient) for each held-out prompt. Its mean per-token entropy H — the
    entropy of its own next-token distribution at `args.temperature`, averaged over all sampled tokens — is compared
    with the gate: the ladder advances when H ≥ H_min. The new length is used from that step's generation batch on.

    Under several processes every rank samples the same prompts with the same seed and the (Σ entropy, token count)
    pairs are summed over ranks before dividing, so every rank takes the same decision (this also keeps every rank
    in `generate` together, as DeepSpeed ZeRO-3 requires).

    Args:
        lengths: strictly increasing positive `max_completion_length` values, L_0 first. The last one plus the
            longest held-out prompt must fit in the model's `max_position_embeddings`.
        min_entropy: H_min in nats, or a string `"<r>x"` for r × the held-out entropy measured at train begin (before
            the first step, at L_0), which is stored in the callback's state so a resumed run keeps it.
        check_every_steps: how often (in optimizer steps) the gate is evaluated.
        min_steps_per_stage: the least number of steps spent at a length before the next one may be reached.
        eval_prompts: held-out prompts (conversational message lists or strings, in the dataset's format) or a dataset
            with a `prompt` column; None uses the trainer's `eval_dataset`. Only the first `max_eval_prompts` are used,
            in one batch.
        max_eval_prompts: how many held-out prompts are sampled at each check.

    Logs `opd/max_completion_length`, `opd/curriculum_stage` and, once measured, `opd/heldout_entropy` (the last
    measurement). The state saves the stage, the step it began at, the baseline and the last entropy, so a resumed
    run (with `restore_callback_states_from_checkpoint=True`, `OPDConfig`'s default) stays on its stage.

    Example:
        ```python
        EntropyGatedLengthCurriculum([1024, 2048, 4096], min_entropy="0.8x", check_every_steps=50)
        ```
    """

    state_attributes = ("stage", "stage_start_step", "baseline_entropy", "heldout_entropy")

    def __init__(
        self,
        lengths: Sequence[int],
        min_entropy: float | str,
        check_every_steps: int = 50,
        min_steps_per_stage: int = 50,
        eval_prompts: Any = None,
        *,
        max_eval_prompts: int = 16,
    ) -> None:
        super().__init__()
        lengths = list(lengths)
        if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
            raise ValueError(f"`lengths` must be a non-empty list of positive integers, got {lengths!r}.")
        if any(b <= a for a, b in zip(lengths, lengths[1:])):
            raise ValueError(f"`lengths` must be strictly increasing (a ladder L_0 < L_1 < …), got {lengths}.")
        self.gate, self.relative_gate = parse_min_entropy(min_entropy)
        for name, value, least in (
            ("check_every_steps", check_every_steps, 1),
            ("min_steps_per_stage", min_steps_per_stage, 0),
            ("max_eval_prompts", max_eval_prompts, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"`{name}` must be an integer >= {least}, got {value!r}.")
        if eval_prompts is not None:
            held_out_columns(eval_prompts, None, ("prompt",), type(self).__name__)  # fails now if empty or malformed
        self.lengths, self.min_entropy = lengths, min_entropy
        self.check_every_steps, self.min_steps_per_stage = check_every_steps, min_steps_per_stage
        self.eval_prompts, self.max_eval_prompts = eval_prompts, max_eval_prompts
        self.stage, self.stage_start_step = 0, 0
        self.baseline_entropy: float | None = None
        self.heldout_entropy: float | None = None
        self._prompt_ids: list[list[int]] = []

    def constructor_args(self) -> dict[str, Any]:
        return {
            "lengths": self.lengths,
            "min_entropy": self.min_entropy,
            "check_every_steps": self.check_every_steps,
            "min_steps_per_stage": self.min_steps_per_stage,
            "max_eval_prompts": self.max_eval_prompts,
        }

    @property
    def threshold(self) -> float:
        """H_min in nats (for a relative gate, once the baseline is measured)."""
        return self.gate * self.baseline_entropy if self.relative_gate else self.gate

    def on_train_begin(
        self, args: Any, state: TrainerState, control: TrainerControl, model=None, processing_class=None, **kwargs
    ) -> None:
        if self.stage >= len(self.lengths):
            raise ValueError(f"The restored curriculum stage {self.stage} is beyond the ladder {self.lengths}.")
        tokenizer = tokenizer_of(processing_class)
        prompts = held_out_columns(self.eval_prompts, self.eval_dataset, ("prompt",), type(self).__name__)["prompt"]
        self._prompt_ids = tokenize_prompts(tokenizer, prompts[: self.max_eval_prompts], args.chat_template_kwargs)
        context = model.config.get_text_config().max_position_embeddings
        prompt_budget = max(map(len, self._prompt_ids))
        if context is not None and self.lengths[-1] + prompt_budget > context:
            raise ValueError(
                f"The ladder's last length ({self.lengths[-1]}) plus the longest held-out prompt ({prompt_budget} "
                f"tokens) exceeds the model's `max_position_embeddings` ({context}). Keep every length at most "
                f"{context - prompt_budget}."
            )
        if self.relative_gate and self.baseline_entropy is None:
            self.baseline_entropy = self._measure(args, model, tokenizer, self.lengths[0])
        args.max_completion_length = self.lengths[self.stage]

    def on_step_begin(
        self, args: Any, state: TrainerState, control: TrainerControl, model=None, processing_class=None, **kwargs
    ) -> None:
        step = state.global_step
        if (
            step > 0
            and step % self.check_every_steps == 0
            and self.stage < len(self.lengths) - 1
            and step - self.stage_start_step >= self.min_steps_per_stage
        ):
            self.heldout_entropy = self._measure(args, model, tokenizer_of(processing_class), self.lengths[self.stage])
            if self.heldout_entropy >= self.threshold:
                self.stage, self.stage_start_step = self.stage + 1, step
        args.max_completion_length = self.lengths[self.stage]

    def _measure(self, args: Any, model: Any, tokenizer: Any, max_new_tokens: int) -> float:
        """Mean per-token entropy of the student's samples on the held-out prompts, pooled over all ranks."""
        total, count = sampled_entropy(
            model,
            tokenizer,
            self._prompt_ids,
            max_new_tokens=max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
        )
        total, count = sum_over_processes([total, count], next(model.parameters()).device)
        return total / count

    def metrics(self, args: Any) -> dict[str, float]:
        logs = {
            "opd/max_completion_length": float(self.lengths[self.stage]),
            "opd/curriculum_stage": float(self.stage),
        }
        if self.heldout_entropy is not None:
            logs["opd/heldout_entropy"] = self.heldout_entropy
        return logs
