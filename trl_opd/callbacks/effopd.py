"""`EffOPDCallback`: weight extrapolation along the training direction, kept only while a held-out score improves.

docs/concepts.md (EffOPD, arXiv 2605.11739, and its official code): at global steps that are powers of two, with
anchor B (the weights at train begin, then the weights left by the previous extrapolation) and current weights W,
Δ = W − B and the candidates are W + aΔ for a = 2, 4, 6, … (at most `max_tries`). Each candidate is kept only if the
held-out score is strictly higher than the best so far (starting from W's own); at the first one that is not, the
last kept weights are restored and the search stops. Only attention and MLP weights move; the optimizer and the
learning-rate scheduler are untouched.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import DistributedType, PartialState
from safetensors.torch import load_file, save_file
from transformers import TrainerControl, TrainerState

from ..evaluation import evaluate
from ..rollouts import sampling_context, tokenizer_of
from .base import OPDCallback
from .heldout import held_out_columns, sum_over_processes

ATTENTION_MLP_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ANCHOR_FILE = "effopd_anchor.safetensors"

ScoreFn = Callable[[Any, Any], float]


def extrapolated_parameters(model: torch.nn.Module, modules: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters inside a module named in `modules` (any path component matches).

    On a full model these are the attention and MLP projection weights (and biases); on a PEFT-LoRA model, whose
    base weights are frozen, the `lora_A`/`lora_B` adapter weights of those modules.
    """
    names = set(modules)
    return {
        name: param
        for name, param in model.named_parameters()
        if param.requires_grad and names.intersection(name.split("."))
    }


def is_power_of_two(step: int) -> bool:
    return step > 0 and step & (step - 1) == 0


class EffOPDCallback(OPDCallback):
    """EffOPD: at power-of-two global steps, try W ← W + a(W − B) for a = 2, 4, …, kept while a held-out score rises.

    Args:
        score_fn: `score_fn(model, processing_class) -> float`, higher is better, run without gradient in eval mode
            and inside a forked RNG (the training sampling stream is unaffected). None: greedy accuracy of
            `trl_opd.evaluation.evaluate` (needs math-verify) on the held-out problems, with completions of at most
            `args.max_completion_length` tokens.
        eval_prompts: the held-out problems of the default score, a dataset (or dict of columns) with `prompt` and
            `answer`; None uses the trainer's `eval_dataset`. Must be None with a custom `score_fn`.
        max_tries: the most candidates per extrapolation (a = 2, 4, …, 2·`max_tries`).
        target_modules: names of the modules whose trainable weights move (default: the attention and MLP
            projections of Llama/Qwen/Mistral-style decoders; for LoRA this selects the adapters of those modules).

    Every rank runs `score_fn` and the scores are averaged over ranks, so all ranks keep the same candidate. Refused
    under DeepSpeed and FSDP: their optimizers hold sharded (or fp32 master) copies of the weights, which an in-place
    change of the module's parameters would not reach, and ZeRO-3/FSDP parameters are sharded.

    Memory: B and, during an extrapolation, W are kept on the CPU (one copy each of the moved weights).

    Logs, after the first extrapolation: `opd/effopd_accepted` (candidates kept at the last one), `opd/effopd_alpha`
    (the a of the kept weights, 0 if none) and `opd/effopd_score` (their score).

    Resume: the state holds the anchor's step and the last results; the anchor's tensors (not JSON material) are
    written at each checkpoint as `checkpoint-<step>/effopd_anchor.safetensors` and read back at train begin from the
    checkpoint `OPDTrainer.train(resume_from_checkpoint=...)` resumes from. Without a restored state (e.g.
    `restore_callback_states_from_checkpoint=False`) the resumed run anchors at its starting weights.
    """

    state_attributes = ("anchor_step", "accepted", "alpha", "score")

    def __init__(
        self,
        score_fn: ScoreFn | None = None,
        eval_prompts: Any = None,
        max_tries: int = 5,
        *,
        target_modules: Sequence[str] = ATTENTION_MLP_MODULES,
    ) -> None:
        super().__init__()
        if score_fn is not None and not callable(score_fn):
            raise ValueError(f"`score_fn` must be callable as score_fn(model, processing_class), got {score_fn!r}.")
        if score_fn is not None and eval_prompts is not None:
            raise ValueError(
                "`eval_prompts` feeds the default score (accuracy); a custom `score_fn` chooses its own data. Pass "
                "one of them."
            )
        if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
            raise ValueError(f"`max_tries` must be an integer >= 1, got {max_tries!r}.")
        if isinstance(target_modules, str) or not target_modules:
            raise ValueError(f"`target_modules` must be a non-empty list of module names, got {target_modules!r}.")
        self.score_fn, self.eval_prompts, self.max_tries = score_fn, eval_prompts, max_tries
        self.target_modules = tuple(target_modules)
        self.anchor_step: int | None = None
        self.accepted: int | None = None
        self.alpha: float | None = None
        self.score: float | None = None
        self._anchor: dict[str, torch.Tensor] = {}
        self._scorer: ScoreFn | None = None

    def constructor_args(self) -> dict[str, Any]:
        return {"max_tries": self.max_tries, "target_modules": list(self.target_modules)}

    # ------------------------------------------------------------------------------------------------------ events

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, model=None, **kwargs) -> None:
        distributed = PartialState().distributed_type
        if distributed in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise ValueError(
                f"EffOPDCallback does not support {distributed.value}: the optimizer keeps its own sharded or fp32 "
                "master copy of the weights (and ZeRO-3/FSDP shard the parameters), so extrapolating the module's "
                "parameters in place would be lost or wrong. Use DDP or a single process."
            )
        parameters = extrapolated_parameters(model, self.target_modules)
        if not parameters:
            raise ValueError(
                f"No trainable parameter of the model sits in a module named {list(self.target_modules)}. Pass the "
                "names of its attention and MLP projections as `target_modules`."
            )
        self._scorer = self.score_fn or self._default_score(args)
        if self.anchor_step is None or state.global_step == 0:
            self.anchor_step = state.global_step
            self._anchor = {name: param.detach().to("cpu", copy=True) for name, param in parameters.items()}
        else:
            self._anchor = self._load_anchor(state, parameters)

    def on_step_end(
        self, args: Any, state: TrainerState, control: TrainerControl, model=None, processing_class=None, **kwargs
    ) -> None:
        if not is_power_of_two(state.global_step):
            return
        parameters = extrapolated_parameters(model, self.target_modules)
        self._extrapolate(model, processing_class, parameters)
        self.anchor_step = state.global_step
        self._anchor = {name: param.detach().to("cpu", copy=True) for name, param in parameters.items()}

    def on_save(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if state.is_world_process_zero:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", ANCHOR_FILE)
            save_file({name: tensor.contiguous() for name, tensor in self._anchor.items()}, path)

    def metrics(self, args: Any) -> dict[str, float]:
        if self.alpha is None:
            return {}
        return {
            "opd/effopd_accepted": float(self.accepted),
            "opd/effopd_alpha": self.alpha,
            "opd/effopd_score": self.score,
        }

    # ------------------------------------------------------------------------------------------------- extrapolation

    def _extrapolate(self, model: Any, processing_class: Any, parameters: dict[str, torch.nn.Parameter]) -> None:
        """Score W, then W + aΔ for a = 2, 4, …; keep each only if strictly better, else restore the last kept."""
        current = {name: param.detach().to("cpu", copy=True) for name, param in parameters.items()}
        best = self._evaluate(model, processing_class)
        accepted, alpha = 0, 0.0
        for attempt in range(1, self.max_tries + 1):
            self._set_weights(parameters, current, 2.0 * attempt)
            candidate = self._evaluate(model, processing_class)
            if candidate <= best:
                self._set_weights(parameters, current, alpha)
                break
            best, accepted, alpha = candidate, attempt, 2.0 * attempt
        self.accepted, self.alpha, self.score = accepted, alpha, best

    @torch.no_grad()
    def _set_weights(
        self, parameters: dict[str, torch.nn.Parameter], current: dict[str, torch.Tensor], alpha: float
    ) -> None:
        """Set each parameter to W + alpha·(W − B), computed in fp32 from the saved W (exactly W for alpha = 0)."""
        for name, param in parameters.items():
            weight = current[name].to(param.device)
            if alpha == 0:
                param.copy_(weight)
            else:
                anchor = self._anchor[name].to(param.device)
                param.copy_(weight.float() + alpha * (weight.float() - anchor.float()))

    def _evaluate(self, model: Any, processing_class: Any) -> float:
        """`score_fn` without gradient, in eval mode, in a forked RNG; averaged over processes."""
        with torch.no_grad(), sampling_context([model]):
            value = float(self._scorer(model, processing_class))
        return sum_over_processes([value], next(model.parameters()).device)[0] / PartialState().num_processes

    def _default_score(self, args: Any) -> ScoreFn:
        """Greedy accuracy (`trl_opd.evaluation.evaluate`) on the held-out problems."""
        problems = held_out_columns(self.eval_prompts, self.eval_dataset, ("prompt", "answer"), type(self).__name__)

        def accuracy(model: Any, processing_class: Any) -> float:
            metrics = evaluate(
                model,
                tokenizer_of(processing_class),
                problems,
                k=1,
                max_new_tokens=args.max_completion_length,
                temperature=0.0,
                seed=args.seed,
                progress=False,
            )
            return metrics["accuracy"]

        return accuracy

    def _load_anchor(self, state: TrainerState, parameters: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        """The anchor saved in the checkpoint being resumed from (see `OPDCallback.prepare`)."""
        if self.resume_from_checkpoint is None:
            raise ValueError(
                f"EffOPDCallback resumes at step {state.global_step} but was not told the checkpoint directory that "
                f"holds its {ANCHOR_FILE}: train with `OPDTrainer.train(resume_from_checkpoint=...)`."
            )
        path = os.path.join(self.resume_from_checkpoint, ANCHOR_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Resuming EffOPD at step {state.global_step} needs its anchor weights (from step {self.anchor_step}) "
                f"in {path}, which does not exist (a checkpoint saved without EffOPDCallback, or one whose save was "
                "interrupted). Resume from a checkpoint written with the callback."
            )
        anchor = load_file(path)
        if set(anchor) != set(parameters):
            raise ValueError(
                f"{path} holds weights for other parameters than the model's extrapolated ones; was it saved with "
                "another model or `target_modules`?"
            )
        return anchor
