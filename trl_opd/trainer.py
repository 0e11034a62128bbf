"""`OPDTrainer`: `trl.DistillationTrainer` with the prefix source and the divergence chosen independently.

The trainer wires the config to small parts and overrides only where the knobs enter TRL's flow (everything else —
generation with HF or vLLM, tool calling, PEFT, DeepSpeed/FSDP preparation of both models, buffering of one
generation per gradient-accumulation window, logging — is TRL's):

- `_generate_and_score_completions`: draws the batch's prefix source, lets TRL build the batch with the completions
  `prefixes.PrefixWriter` writes (through `_generate_single_turn`), adds the special-token loss mask and recounts
  `num_items_in_batch` over it.
- `_compute_loss`: gathers the student, the teacher (`teachers.Teacher`) and the optional reference and gold
  completions at the loss positions, decides collectively on non-finite values, evaluates `objective.Objective` and
  normalises it like TRL's loss.

`tests/test_trl_contract.py` pins every TRL internal these overrides rely on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from trl import DistillationTrainer

from .callbacks import OPDCallback
from .checkpoints import resolve_resume_checkpoint
from .config import OPDConfig
from .diagnostics import repeated_token_mask
from .heads import OutputHead, Positions
from .hidden_states import HiddenStates
from .nonfinite import NonFiniteLossError, nonfinite_message, nonfinite_ranks, skipped_loss
from .objective import LossBatch, Objective
from .prefixes import PrefixWriter, dataset_completions, draw_prefix_source, padded_completions
from .reference import InitialStudent
from .served_teacher import is_served
from .teacher_cache import CachedTeacher, cached_batch
from .teacher_loading import build_teacher
from .teacher_routing import TEACHER_INDEX, TeacherRouter
from .telemetry import (
    MetricBuffer,
    completion_rates,
    diagnosed_teachers,
    diagnostics_due,
    per_teacher_metrics,
    per_teacher_names,
)
from .train_sampler import EpochSeededRepeatSampler
from .validation import validate_inputs, validate_prepared, vocab_size

# TRL 1.16 reads `is_gradient_checkpointing` and calls `gradient_checkpointing_disable/enable` around every generation
# (trl.models.utils.unwrap_model_for_generation), names transformers 5.23 deprecated for `*activation_checkpointing*`:
# a warning at each such call that no trl-opd user can act on. Only these three messages are hidden; the config's
# `gradient_checkpointing` deprecation, which a user can act on, still shows. Drop with the next TRL pin.
warnings.filterwarnings(
    "ignore",
    message=r"`(is_gradient_checkpointing|gradient_checkpointing_(enable|disable))` is deprecated",
    category=FutureWarning,
)

THINK_TAGS = ("<think>", "</think>")


class OPDTrainer(DistillationTrainer):
    """On-policy distillation with decoupled prefix source × token-level divergence (docs/concepts.md).

    Takes the same arguments as [`trl.DistillationTrainer`]; `args` must be an [`OPDConfig`]. `teacher_model` is a
    model or a model id/path sharing the student's vocabulary, the http(s) URL of a teacher served with vLLM's
    protocol, a dict {name: any of those} of several teachers (each row names its own in the column
    `args.teacher_column`), or None when the train dataset carries a cached teacher top-k (`trl_opd.teacher_cache`)
    and `prefix_source='dataset'` (docs/teachers.md). With `prefix_source` 'dataset' (or 'mixed' with
    `off_policy_source='dataset'`) the train dataset needs a `completion` column.

    Example (offline, with the toy tokenizer and tiny models of `trl_opd.toy`):

    ```python
    >>> from datasets import Dataset
    >>> from trl_opd import OPDConfig, OPDTrainer
    >>> from trl_opd.toy import build_model, build_tokenizer
    >>> tokenizer = build_tokenizer()
    >>> dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1+2?"}]] * 8})
    >>> args = OPDConfig("out", max_steps=2, per_device_train_batch_size=4, max_completion_length=8, bf16=False)
    >>> trainer = OPDTrainer(
    ...     build_model(tokenizer), build_model(tokenizer, seed=1), args, dataset, processing_class=tokenizer
    ... )
    >>> trainer.train()
    ```
    """

    _tag_names = ["trl", "distillation", "trl-opd"]
    _name = "OPD"

    def __init__(
        self,
        model: str | PreTrainedModel,
        teacher_model: str | PreTrainedModel | Mapping[str, str | PreTrainedModel] | None = None,
        args: OPDConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: list[Callable] | None = None,
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or "model"
            args = OPDConfig(f"{str(name).split('/')[-1]}-OPD")
        if not isinstance(args, OPDConfig):
            raise TypeError(
                f"`args` must be an `OPDConfig`, got {type(args).__name__}. `OPDConfig` takes every "
                "`DistillationConfig` field: build it with the same arguments."
            )
        validate_inputs(args, model, teacher_model, train_dataset, eval_dataset, tools)
        one_local = not (is_served(teacher_model) or isinstance(teacher_model, Mapping))
        super().__init__(
            model=model,
            # TRL loads and prepares a single local teacher; served ones are scored over HTTP, several routed here
            teacher_model=teacher_model if one_local else None,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
        )
        vocabulary = vocab_size(self.accelerator.unwrap_model(self.model))
        validate_prepared(args, self._tokenizer, vocabulary)
        self.special_token_ids = self._loss_masked_token_ids()
        self.hidden_states = HiddenStates(self._get_last_hidden_state, self._forward_redirection)
        self.teacher = build_teacher(self, teacher_model, vocabulary)
        self.reference = InitialStudent(self, self.hidden_states) if args.ref_kl_coef > 0 else None
        self.prefixes = PrefixWriter(self)
        self.metric_buffer = MetricBuffer()
        self._eval_draws = 0

    @property
    def ref_model(self) -> torch.nn.Module | None:
        """The prepared frozen copy of the initial student (`ref_kl_coef`); None without one or under PEFT."""
        return None if self.reference is None else self.reference.model

    def _loss_masked_token_ids(self) -> torch.Tensor:
        """Ids excluded from the loss by `mask_special_tokens`: special and think tokens, minus the answer's EOS."""
        if not self.args.mask_special_tokens:
            return torch.empty(0, dtype=torch.long)
        tokenizer = self._tokenizer
        ids = set(tokenizer.all_special_ids)
        ids |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        ids |= {i for tag in THINK_TAGS if (i := tokenizer.convert_tokens_to_ids(tag)) != tokenizer.unk_token_id}
        if not self.args.mask_eos:
            ids -= set(self.eos_token_ids)
        ids.discard(None)
        return torch.tensor(sorted(ids), dtype=torch.long)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """`Trainer.train`, resuming only from complete checkpoints (see `trl_opd.checkpoints`).

        The `OPDCallback`s are first handed the `eval_dataset` (their default held-out set) and the checkpoint resumed
        from (where they saved files, such as EffOPD's anchor weights).
        """
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, OPDCallback):
                callback.prepare(eval_dataset=self.eval_dataset, resume_from_checkpoint=checkpoint)
        return super().train(resume_from_checkpoint=checkpoint, **kwargs)

    def _get_train_sampler(self, dataset=None):
        return EpochSeededRepeatSampler.like(super()._get_train_sampler(dataset))

    # ------------------------------------------------------------------------------------------------- prefixes

    def _draw_prefix_source(self, mode: str) -> str:
        if mode == "train":
            draw_index = self.state.global_step
        else:
            draw_index, self._eval_draws = -1 - self._eval_draws, self._eval_draws + 1
        args = self.args
        return draw_prefix_source(
            args.prefix_source, args.off_policy_source, args.student_prefix_fraction, args.seed, draw_index
        )

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        mode = "train" if self.model.training else "eval"
        source = self._draw_prefix_source(mode)
        with self.prefixes.batch(source, inputs):
            output = super()._generate_and_score_completions(inputs)
        metrics = self._metrics[mode]
        metrics["opd/student_prefix"].append(float(source == "student"))

        loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
        special = torch.isin(output["completion_ids"], self.special_token_ids.to(loss_mask.device))
        output["loss_mask"] = loss_mask * (~special)
        output["num_items_in_batch"] = self.accelerator.gather(output["loss_mask"].sum()).sum()
        rates = completion_rates(
            output["completion_ids"], output["completion_mask"], self._tokenizer, self.eos_token_ids, self.args
        )
        truncated, repetitive, count = self.accelerator.gather(rates.unsqueeze(0)).sum(0).tolist()
        metrics["opd/truncation_rate"].append(truncated / max(count, 1))
        metrics["opd/repetition_rate"].append(repetitive / max(count, 1))
        if isinstance(self.teacher, CachedTeacher):
            output.update(cached_batch(inputs, output["completion_ids"], output["completion_mask"]))
        if isinstance(self.teacher, TeacherRouter):
            output[TEACHER_INDEX] = torch.tensor(self.teacher.indices(inputs), device=loss_mask.device)
        if self.args.gold_sft_weight > 0:
            prompts = [ids[mask.bool()].tolist() for ids, mask in zip(output["prompt_ids"], output["prompt_mask"])]
            gold_ids, gold_mask = padded_completions(
                dataset_completions(self, inputs, prompts), self._tokenizer.pad_token_id, loss_mask.device
            )
            output.update(
                gold_ids=gold_ids, gold_mask=gold_mask, gold_num_items=self.accelerator.gather(gold_mask.sum()).sum()
            )
        return output

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        def generate(rows: list[int]) -> list[list[int]]:
            if len(rows) == len(prompt_ids):
                return super(OPDTrainer, self)._generate_single_turn(
                    prompt_ids, images, multimodal_fields, has_tool_images
                )
            if images is not None or multimodal_fields:
                raise ValueError(
                    "Several teachers writing the prefixes of one batch need text-only prompts; with images use "
                    "`prefix_source='student'` or one teacher."
                )
            return super(OPDTrainer, self)._generate_single_turn([prompt_ids[i] for i in rows], None, {}, False)

        return self.prefixes.write(prompt_ids, generate)

    # -------------------------------------------------------------------------------------------- callbacks, logs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the `opd/` values of the `OPDCallback`s (schedules, curriculum, EffOPD) to each training log.

        `Trainer.log` stores a copy of `logs` in `state.log_history` and runs the reporting integrations before user
        callbacks, so a callback's `on_log` cannot add values that reach either; they are merged here instead.
        """
        if "loss" in logs:  # a training log entry (evaluation entries carry `eval_loss`)
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, OPDCallback):
                    logs.update(callback.metrics(self.args))
        super().log(logs, start_time)

    def _load_callback_state(self) -> None:
        """Restore stateful callbacks in place on resume.

        `Trainer` rebuilds each one from its JSON constructor arguments, which cannot hold a score function or a
        prompt list; here the saved `attributes` are set on the callbacks the user passed (matched by class name, in
        order), so nothing the constructor received is lost and no schedule silently restarts.
        """
        if not self.args.restore_callback_states_from_checkpoint:
            return
        callbacks = [*self.callback_handler.callbacks, self.control]
        for name, saved in self.state.stateful_callbacks.items():
            matching = [callback for callback in callbacks if type(callback).__name__ == name]
            # With several instances of a class, `Trainer._save_checkpoint` appends their states at every save
            # (after the initial ones), so the latest states are the last `len(matching)` entries.
            states = saved[-len(matching) :] if isinstance(saved, list) and matching else [saved]
            for callback, data in zip(matching, states):
                for attribute, value in data.get("attributes", {}).items():
                    setattr(callback, attribute, value)

    # ------------------------------------------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.metric_buffer.flush(self.accelerator, self._metrics["train" if self.model.training else "eval"])
        return output

    def _loss_batch(self, objective: Objective, unwrapped_student, inputs) -> tuple[LossBatch, torch.Tensor]:
        """Each model's distributions at the positions the objective's terms need, and the (B, T) loss mask."""
        args = self.args
        student_head = OutputHead.from_model(unwrapped_student, args.temperature)
        mask = inputs["loss_mask"].to(student_head.weight.device).bool()
        student_hidden = self.hidden_states.trainable(unwrapped_student, inputs).to(mask.device)[mask]
        teacher = self.teacher.at_positions(inputs, mask, args.resolved_teacher_temperature, args.loss_top_k)
        gold = gold_ids = reference = None
        if objective.uses("ref_kl"):
            reference = self.reference.at_positions(unwrapped_student, inputs, mask, args.temperature)
        if objective.uses("gold_sft"):
            gold_mask = inputs["gold_mask"].to(mask.device).bool()
            hidden = self.hidden_states.trainable(unwrapped_student, inputs, "gold_ids", "gold_mask")
            gold, gold_ids = Positions(hidden.to(mask.device)[gold_mask], student_head), inputs["gold_ids"][gold_mask]
        token_ids = inputs["completion_ids"].to(mask.device)[mask]
        batch = LossBatch(Positions(student_hidden, student_head), teacher, token_ids, reference, gold, gold_ids)
        for answer in batch.answers:
            if isinstance(answer, Positions) and answer.head.weight.device != student_head.weight.device:
                raise ValueError(
                    f"The student `lm_head` is on {student_head.weight.device} but the teacher's is on "
                    f"{answer.head.weight.device}. Place both heads on the same device in their `device_map`."
                )
        return batch, mask

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        objective = Objective.from_args(self.args)
        training = self.model.training
        diagnosed = diagnosed_teachers(self.teacher)
        diagnose = bool(diagnosed) and diagnostics_due(self.args, training, self._step, self.state.global_step)
        self.metric_buffer.start(objective.metric_names + per_teacher_names(self.teacher, self.args, diagnose))
        batch, mask = self._loss_batch(objective, unwrapped_student, inputs)
        value = objective.evaluate(batch)
        if not self._all_ranks_finite(batch, value):  # every rank skips this micro-batch (or all raised)
            return skipped_loss(batch.student), value.entropy.new_zeros(()), mask.sum()
        self.metric_buffer.record(value.metrics)
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = value.per_position.sum() / denominator
        if value.per_gold_token is not None:  # normalised over the global batch's gold tokens, like the loss
            gold_items = inputs["gold_num_items"].clamp(min=1) / self.accelerator.num_processes
            loss = loss + value.per_gold_token.sum() / (gold_items if training else max(batch.gold_ids.numel(), 1))
        repeated = repeated_token_mask(inputs["completion_ids"].cpu()).to(mask.device)[mask] if diagnose else None
        self.metric_buffer.record(per_teacher_metrics(batch, objective, value, repeated, diagnosed, self.args))
        return loss, value.entropy.sum(), mask.sum()

    def _all_ranks_finite(self, batch: LossBatch, value) -> bool:
        """One collective decision on NaN/inf (`trl_opd.nonfinite`): every rank raises the same
        `NonFiniteLossError` (`nonfinite_policy='stop'`) or every rank skips the micro-batch ('skip')."""
        bad = batch.nonfinite()
        losses = [value.per_position] + ([value.per_gold_token] if value.per_gold_token is not None else [])
        if not all(bool(torch.isfinite(loss).all()) for loss in losses):
            bad.append("loss")
        per_rank = nonfinite_ranks(self.accelerator, bad)
        if not any(per_rank.values()):
            return True
        accumulation = max(self.args.gradient_accumulation_steps, 1)
        message = nonfinite_message(per_rank, self.state.global_step, self._step % accumulation)
        if self.args.nonfinite_policy == "stop":
            raise NonFiniteLossError(
                f"{message} Training stopped before updating on it. Check the teacher (dtype overflow, e.g. fp16), "
                "the learning rate, or set `nonfinite_policy='skip'` to skip such micro-batches."
            )
        warnings.warn(f"{message} Skipped on every rank (`nonfinite_policy='skip'`): zero loss.", stacklevel=2)
        self._metrics["train" if self.model.training else "eval"]["opd/skipped_nonfinite"].append(1.0)
        return False
