"""`OPDTrainer`: `trl.DistillationTrainer` with the prefix source and the divergence chosen independently.

What is overridden, and why (everything else — generation with HF or vLLM, tool calling, PEFT, DeepSpeed/FSDP
preparation of both models, buffering of one generation per gradient-accumulation window, logging — is TRL's):

- `_generate_and_score_completions`: draws the batch's prefix source, then lets TRL build the batch; adds the
  special-token loss mask and recounts `num_items_in_batch` over it.
- `_generate_single_turn`: student prefixes are TRL's; teacher prefixes run TRL's same generation code on the
  teacher at its own temperature; dataset prefixes are the tokenised `completion` column.
- `_compute_loss`: gathers the loss positions' hidden states (TRL's `_get_last_hidden_state`) and hands them to
  `chunked.divergence_from_hidden`, which reuses TRL's chunked kernels for the full and sampled-token supports.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainerCallback
from trl import DistillationTrainer
from trl.models import prepare_deepspeed
from trl.trainer.utils import pad

from .callbacks import OPDCallback
from .checkpoints import resolve_resume_checkpoint
from .chunked import OutputHead, divergence_from_hidden, entropy_gated_forward_kl, full_divergence, token_log_probs
from .config import OPDConfig
from .diagnostics import (
    TOKEN_DIAGNOSTICS,
    head_gradient_coherence,
    repeated_token_mask,
    repetition_rate,
    repetition_threshold,
    token_diagnostics,
    truncation_rate,
)
from .losses import per_token_divergence
from .prefixes import dataset_completion_ids, draw_prefix_source, validate_prompt_dataset
from .sampling import EpochSeededRepeatSampler

THINK_TAGS = ("<think>", "</think>")
COHERENCE_POSITIONS = 64
MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


class NonFiniteLossError(FloatingPointError):
    """The teacher's or student's hidden states, or the divergence, were NaN/inf (see `nonfinite_policy`)."""


def _vocab_size(model: PreTrainedModel) -> int:
    return model.config.get_text_config().vocab_size


class OPDTrainer(DistillationTrainer):
    """On-policy distillation with decoupled prefix source × token-level divergence (docs/concepts.md).

    Takes the same arguments as [`trl.DistillationTrainer`]; `args` must be an [`OPDConfig`]. The teacher is
    required and must share the student's vocabulary. With `prefix_source` 'dataset' (or 'mixed' with
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
        teacher_model: str | PreTrainedModel | None = None,
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
        if teacher_model is None:
            raise ValueError("OPDTrainer needs a `teacher_model` (a model id/path or an instantiated model).")
        uses_dataset = args.prefix_source == "dataset" or (
            args.prefix_source == "mixed" and args.off_policy_source == "dataset"
        )
        needs_completion = uses_dataset or args.gold_sft_weight > 0
        validate_prompt_dataset(train_dataset, "train_dataset", needs_completion=needs_completion)
        validate_prompt_dataset(eval_dataset, "eval_dataset", needs_completion=needs_completion)
        if tools and uses_dataset:
            raise ValueError(
                "Tool calling needs generated completions; with tools use `prefix_source` 'student'/'teacher'."
            )
        if isinstance(model, PreTrainedModel) and isinstance(teacher_model, PreTrainedModel):
            self._check_vocabularies(model, teacher_model)

        super().__init__(
            model=model,
            teacher_model=teacher_model,
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
        vocab_size = _vocab_size(self.accelerator.unwrap_model(self.model))
        self._check_tokenizer(vocab_size)
        if args.loss_support in ("teacher_topk", "student_topk", "union_topk") and args.loss_top_k > vocab_size:
            raise ValueError(
                f"`loss_top_k={args.loss_top_k}` exceeds the vocabulary size ({vocab_size}). Lower `loss_top_k` "
                "(Li et al. find k between 4 and 64 equivalent)."
            )
        self.special_token_ids = self._loss_masked_token_ids()
        self.ref_model = self._prepare_reference() if args.ref_kl_coef > 0 else None
        self._pending_metrics: dict[str, tuple[torch.Tensor, int]] = {}
        self._prefix_source = "student"  # the source of the generation batch being built
        self._pending_inputs: list[dict[str, Any]] | None = None
        self._eval_draws = 0

    @staticmethod
    def _check_vocabularies(student: PreTrainedModel, teacher: PreTrainedModel) -> None:
        student_vocab, teacher_vocab = _vocab_size(student), _vocab_size(teacher)
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"The student's vocabulary has {student_vocab} entries but the teacher's has {teacher_vocab}. "
                "Token-level distillation compares next-token distributions over one vocabulary: use a teacher from "
                "the student's model family (same tokenizer), or resize one embedding to match if the extra rows are "
                "unused padding."
            )

    def _check_tokenizer(self, vocab_size: int) -> None:
        """The tokenizer must address only rows both models have: special tokens included."""
        tokenizer = self._tokenizer
        outside = {
            token: index
            for token, index in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)
            if index is None or index >= vocab_size
        }
        if len(tokenizer) > vocab_size or outside:
            raise ValueError(
                f"The tokenizer ({len(tokenizer)} tokens; special tokens beyond the vocabulary: {outside or 'none'}) "
                f"does not fit the models' vocabulary of {vocab_size}. Use the student's own tokenizer, or call "
                "`resize_token_embeddings(len(tokenizer))` on both models after adding tokens."
            )

    def _prepare_reference(self) -> torch.nn.Module | None:
        """The frozen initial student for `ref_kl_coef`, prepared like TRL prepares the teacher; None with PEFT,
        where the base model with the adapter disabled is the reference (no second copy)."""
        if is_peft_model(self.model):
            return None
        reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(reference, self.accelerator)
        return self.accelerator.prepare_model(reference, evaluation_mode=True)

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

    # ----------------------------------------------------------------------------------------------- prefix source

    def _draw_prefix_source(self, mode: str) -> str:
        if mode == "train":
            draw_index = self.state.global_step
        else:
            draw_index, self._eval_draws = -1 - self._eval_draws, self._eval_draws + 1
        return draw_prefix_source(
            self.args.prefix_source,
            self.args.off_policy_source,
            self.args.student_prefix_fraction,
            self.args.seed,
            draw_index,
        )

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        mode = "train" if self.model.training else "eval"
        self._prefix_source = self._draw_prefix_source(mode)
        self._pending_inputs = inputs
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._pending_inputs = None
        self._metrics[mode]["opd/student_prefix"].append(float(self._prefix_source == "student"))
        self._prefix_source = "student"

        loss_mask = output["completion_mask"] * output.get("tool_mask", 1)
        special = torch.isin(output["completion_ids"], self.special_token_ids.to(loss_mask.device))
        output["loss_mask"] = loss_mask * (~special)
        output["num_items_in_batch"] = self.accelerator.gather(output["loss_mask"].sum()).sum()
        self._log_completion_rates(output, mode)
        if self.args.gold_sft_weight > 0:
            output.update(self._gold_completions(inputs, output))
        return output

    def _log_completion_rates(self, output: dict[str, Any], mode: str) -> None:
        """TruncRate and RepRate (Luo et al.) over the generation batch, reduced across ranks."""
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(output["completion_ids"], output["completion_mask"])]
        tail = self.args.resolved_repetition_tail_chars
        threshold = self.args.repetition_threshold or repetition_threshold(tail)
        texts = self._tokenizer.batch_decode(rows, skip_special_tokens=True)
        local = torch.tensor(
            [
                truncation_rate(rows, self.eos_token_ids, self.args.max_completion_length) * len(rows),
                repetition_rate(texts, tail, threshold) * len(rows),
                len(rows),
            ],
            device=self.accelerator.device,
        )
        truncated, repetitive, count = self.accelerator.gather(local.unsqueeze(0)).sum(0).tolist()
        self._metrics[mode]["opd/truncation_rate"].append(truncated / max(count, 1))
        self._metrics[mode]["opd/repetition_rate"].append(repetitive / max(count, 1))

    def _gold_completions(self, inputs: list[dict[str, Any]], output: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The dataset's gold completions, tokenised after each prompt, for the gold-SFT term."""
        gold = [
            torch.tensor(
                dataset_completion_ids(
                    self._tokenizer,
                    row["prompt"],
                    row["completion"],
                    ids[mask.bool()].tolist(),
                    self.eos_token_ids,
                    self.max_completion_length,
                    **self.chat_template_kwargs,
                )
            )
            for row, ids, mask in zip(inputs, output["prompt_ids"], output["prompt_mask"])
        ]
        device = output["completion_ids"].device
        gold_ids = pad(gold, padding_value=self._tokenizer.pad_token_id, padding_side="right").to(device)
        gold_mask = pad([torch.ones_like(g) for g in gold], padding_value=0, padding_side="right").to(device)
        return {
            "gold_ids": gold_ids,
            "gold_mask": gold_mask,
            "gold_num_items": self.accelerator.gather(gold_mask.sum()).sum(),
        }

    def _sync_generation_knobs(self) -> None:
        """Push `args.temperature`/`args.max_completion_length` into TRL's cached generation settings.

        TRL copies both into its generation config (and vLLM sampler) at construction; callbacks (schedules, the length
        curriculum) change `args`, so the copies are refreshed before every generation batch, on every rank alike.
        """
        temperature, max_length = self.args.temperature, self.args.max_completion_length
        self.temperature, self.max_completion_length = temperature, max_length
        self.generation_kwargs.update(temperature=temperature, max_new_tokens=max_length)
        self.generation_config.temperature, self.generation_config.max_new_tokens = temperature, max_length
        if self.use_vllm:
            self.vllm_generation.temperature = temperature
            self.vllm_generation.max_completion_length = max_length

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        self._sync_generation_knobs()
        if self._prefix_source == "dataset":
            return self._dataset_completions(prompt_ids)
        if self._prefix_source == "teacher":
            with self._teacher_generates():
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)

    def _dataset_completions(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        if self._pending_inputs is None or "completion" not in self._pending_inputs[0]:
            raise ValueError(
                "Dataset prefixes need a `completion` column in the batch (see `validate_prompt_dataset`)."
            )
        return [
            dataset_completion_ids(
                self._tokenizer,
                row["prompt"],
                row["completion"],
                ids,
                self.eos_token_ids,
                self.max_completion_length,
                **self.chat_template_kwargs,
            )
            for row, ids in zip(self._pending_inputs, prompt_ids, strict=True)
        ]

    @contextlib.contextmanager
    def _teacher_generates(self) -> Iterator[None]:
        """Run TRL's HF-generate path with the teacher in the student's place, at the teacher's temperature.

        Swaps the four attributes that path reads (the wrapped model, the vLLM switch, and the generation settings)
        and restores them, so teacher sampling gets exactly the student's settings, gathering and EOS handling.
        """
        temperature = self.args.resolved_teacher_temperature
        saved = (self.model_wrapped, self.use_vllm, self.generation_config, self.generation_kwargs)
        generation_kwargs = {**self.generation_kwargs, "temperature": temperature}
        generation_config = copy.deepcopy(self.generation_config)
        generation_config.temperature = temperature
        self.model_wrapped, self.use_vllm = self.teacher_model, False
        self.generation_config, self.generation_kwargs = generation_config, generation_kwargs
        try:
            yield
        finally:
            self.model_wrapped, self.use_vllm, self.generation_config, self.generation_kwargs = saved

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

    # ------------------------------------------------------------------------------------------------------- loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._flush_metrics()
        return output

    def _hidden_states(self, model, unwrapped, inputs, ids_key: str, mask_key: str) -> torch.Tensor:
        """Last hidden states of `unwrapped` at the positions predicting `inputs[ids_key]`, via TRL's helper.

        The frozen models (teacher, reference) run under no_grad and through `_forward_redirection`, so FSDP and
        DeepSpeed materialise their sharded parameters.
        """
        input_ids = torch.cat([inputs["prompt_ids"], inputs[ids_key]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs[mask_key]], dim=1)
        multimodal = {key: inputs[key] for key in MULTIMODAL_KEYS if key in inputs}
        args = (unwrapped, input_ids, attention_mask, inputs[ids_key].size(1))
        if model is None:
            return self._get_last_hidden_state(*args, **multimodal)
        model.eval()
        with torch.no_grad():
            return self._forward_redirection(model, unwrapped, self._get_last_hidden_state, *args, **multimodal)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        args = self.args
        diagnostics_due = self._diagnostics_due()
        self._pending_metrics = dict.fromkeys(self._metric_names(diagnostics_due), (torch.zeros(()), 0))
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        student_head = OutputHead.from_model(unwrapped_student, args.temperature)
        teacher_head = OutputHead.from_model(unwrapped_teacher, args.resolved_teacher_temperature)
        if student_head.weight.device != teacher_head.weight.device:
            raise ValueError(
                f"The student `lm_head` is on {student_head.weight.device} but the teacher's is on "
                f"{teacher_head.weight.device}. Place both heads on the same device in their `device_map`."
            )
        device = student_head.weight.device
        mask = inputs["loss_mask"].to(device).bool()
        student_all = self._hidden_states(None, unwrapped_student, inputs, "completion_ids", "completion_mask")
        student_hidden = student_all.to(device)[mask]
        teacher_all = self._hidden_states(
            self.teacher_model, unwrapped_teacher, inputs, "completion_ids", "completion_mask"
        )
        teacher_hidden = teacher_all.to(device)[mask]
        token_ids = inputs["completion_ids"].to(device)[mask]
        zero = student_hidden.new_zeros((), requires_grad=True)
        if not (
            self._all_finite(teacher_hidden, "teacher hidden states")
            and self._all_finite(student_hidden, "student hidden states")
        ):
            return zero, student_hidden.new_zeros(()).detach(), mask.sum()

        divergence, entropy = divergence_from_hidden(
            student_hidden,
            teacher_hidden,
            student_head,
            teacher_head,
            kl_direction=args.kl_direction,
            loss_support=args.loss_support,
            loss_top_k=args.loss_top_k,
            loss_add_tail=args.loss_add_tail,
            beta=args.beta,
            forward_kl_weight=args.forward_kl_weight,
            token_ids=token_ids,
        )
        if args.ref_kl_coef > 0:
            divergence = divergence + args.ref_kl_coef * self._reference_kl(
                unwrapped_student, inputs, mask, student_hidden, student_head
            )
        if args.eopd_coef > 0:
            term, gate = entropy_gated_forward_kl(
                student_hidden,
                teacher_hidden,
                student_head,
                teacher_head,
                args.loss_top_k,
                args.eopd_entropy_threshold,
            )
            divergence = divergence + args.eopd_coef * term
            self._record("opd/eopd_gate_share", gate.sum(), gate.numel())
        if not self._all_finite(divergence, "divergence"):
            return zero, entropy.new_zeros(()), mask.sum()
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = divergence.sum() / denominator
        if args.gold_sft_weight > 0:
            loss = loss + args.gold_sft_weight * self._gold_nll(unwrapped_student, inputs, student_head)
        if diagnostics_due:
            self._token_diagnostics(student_hidden, teacher_hidden, student_head, teacher_head, inputs, mask)
        return loss, entropy.sum().detach(), mask.sum()

    def _reference_kl(self, unwrapped_student, inputs, mask, student_hidden, student_head) -> torch.Tensor:
        """Per-token KL(q_θ‖q_ref) to the initial student (Stable-OPD, Luo et al.), with TRL's chunked kernel."""
        if self.ref_model is None:  # PEFT: the base model without the adapter is the reference
            with torch.no_grad(), unwrapped_student.disable_adapter():
                reference = self._hidden_states(None, unwrapped_student, inputs, "completion_ids", "completion_mask")
            reference_head = student_head
        else:
            unwrapped_reference = self.accelerator.unwrap_model(self.ref_model)
            reference = self._hidden_states(
                self.ref_model, unwrapped_reference, inputs, "completion_ids", "completion_mask"
            )
            reference_head = OutputHead.from_model(unwrapped_reference, self.args.temperature)
        kl, _ = full_divergence(
            student_hidden, reference.to(student_hidden.device)[mask], student_head, reference_head, "reverse"
        )
        self._record("opd/ref_kl", kl.detach().sum(), kl.numel())
        return kl

    def _gold_nll(self, unwrapped_student, inputs, student_head) -> torch.Tensor:
        """Mean NLL of the gold completions given their prompts (Stable-OPD's SFT term), normalised like the loss."""
        hidden = self._hidden_states(None, unwrapped_student, inputs, "gold_ids", "gold_mask")
        gold_mask = inputs["gold_mask"].to(hidden.device).bool()
        log_probs = token_log_probs(hidden[gold_mask], student_head, inputs["gold_ids"].to(hidden.device)[gold_mask])
        count = (
            inputs["gold_num_items"].clamp(min=1) / self.accelerator.num_processes
            if self.model.training
            else gold_mask.sum().clamp(min=1)
        )
        self._record("opd/gold_nll", -log_probs.detach().sum(), log_probs.numel())
        return -log_probs.sum() / count

    # ------------------------------------------------------------------------------------------------ diagnostics

    def _diagnostics_due(self) -> bool:
        """Token diagnostics run once per logging window: on the first micro-batch of the step that will log."""
        if self.args.diagnostics_max_positions == 0:
            return False
        if not self.model.training:
            return True
        steps = self.args.logging_steps if self.args.logging_steps >= 1 else 1
        first_micro_batch = self._step % max(self.args.gradient_accumulation_steps, 1) == 0
        return first_micro_batch and (self.state.global_step + 1) % int(steps) == 0

    @torch.no_grad()
    def _token_diagnostics(self, student_hidden, teacher_hidden, student_head, teacher_head, inputs, mask) -> None:
        """Overlap, entropies and log-ratios on ≤ `diagnostics_max_positions` evenly spaced loss positions.

        Evenly spaced rather than random: the diagnostics must not consume RNG draws that training depends on.
        """
        n = student_hidden.shape[0]
        if n == 0:
            return
        picked = torch.linspace(
            0, n - 1, min(n, self.args.diagnostics_max_positions), device=student_hidden.device
        ).long()
        repeated = repeated_token_mask(inputs["completion_ids"].cpu()).to(mask.device)[mask][picked]
        stats = token_diagnostics(
            student_head.logits(student_hidden[picked]),
            teacher_head.logits(teacher_hidden[picked]),
            inputs["completion_ids"].to(mask.device)[mask][picked],
            self.args.diagnostics_top_k,
            repeated,
        )
        if self.args.diagnostics_gradient_coherence:
            stats["gradient_coherence"] = self._gradient_coherence(
                student_hidden[picked[:COHERENCE_POSITIONS]],
                teacher_hidden[picked[:COHERENCE_POSITIONS]],
                student_head,
                teacher_head,
                inputs["completion_ids"].to(mask.device)[mask][picked[:COHERENCE_POSITIONS]],
            )
        for name, value in stats.items():
            self._record(f"opd/{name}", torch.tensor(value), 1)

    def _gradient_coherence(self, student_hidden, teacher_hidden, student_head, teacher_head, token_ids) -> float:
        """`head_gradient_coherence` of the configured loss at a few positions (its per-position logit gradients come
        from autograd on the reference `per_token_divergence`, applied to (n, V) logits)."""
        with torch.enable_grad():
            logits = (student_head.logits(student_hidden.detach()) * student_head.temperature).requires_grad_(True)
            divergence = per_token_divergence(
                logits,
                teacher_head.logits(teacher_hidden) * teacher_head.temperature,
                kl_direction=self.args.kl_direction,
                forward_kl_weight=self.args.forward_kl_weight,
                beta=self.args.beta,
                loss_support=self.args.loss_support,
                loss_top_k=self.args.loss_top_k,
                loss_add_tail=self.args.loss_add_tail,
                temperature=student_head.temperature,
                teacher_temperature=teacher_head.temperature,
                sampled_token_ids=token_ids,
            )
            (grads,) = torch.autograd.grad(divergence.sum(), logits)
        return head_gradient_coherence(grads, student_hidden.detach())

    def _metric_names(self, diagnostics_due: bool) -> list[str]:
        """The metrics this micro-batch may record: a function of the config and the step only, so that every rank
        reduces the same list (a rank with nothing to report sends zeros)."""
        names = [
            name
            for name, coef in (
                ("ref_kl", self.args.ref_kl_coef),
                ("eopd_gate_share", self.args.eopd_coef),
                ("gold_nll", self.args.gold_sft_weight),
            )
            if coef > 0
        ]
        if diagnostics_due:
            names += [*TOKEN_DIAGNOSTICS, "log_ratio_repeated", "log_ratio_non_repeated"]
            if self.args.diagnostics_gradient_coherence:
                names.append("gradient_coherence")
        return [f"opd/{name}" for name in names]

    def _record(self, name: str, total: torch.Tensor, count: int) -> None:
        """Stash a metric's (sum, count) during the forward; `_flush_metrics` reduces it across ranks after it."""
        self._pending_metrics[name] = (total.detach().float().cpu(), count)

    def _flush_metrics(self) -> None:
        """Reduce the stashed metrics across ranks in one gather, outside the wrapped forward, and log their means."""
        if not self._pending_metrics:
            return
        names = list(self._pending_metrics)
        local = torch.tensor([[float(total), float(count)] for total, count in self._pending_metrics.values()])
        reduced = self.accelerator.gather_for_metrics(local.to(self.accelerator.device).unsqueeze(0)).sum(0)
        mode = "train" if self.model.training else "eval"
        for name, (total, count) in zip(names, reduced.tolist()):
            if count > 0:
                self._metrics[mode][name].append(total / count)
        self._pending_metrics = {}

    def _all_finite(self, tensor: torch.Tensor, what: str) -> bool:
        """True if finite; else raise (`nonfinite_policy='stop'`) or warn and report False ('skip')."""
        if bool(torch.isfinite(tensor).all()):
            return True
        accumulation = max(self.args.gradient_accumulation_steps, 1)
        message = (
            f"Non-finite {what} at global step {self.state.global_step}, micro-batch {self._step % accumulation} "
            f"of the accumulation window ({int((~torch.isfinite(tensor)).sum())} entries)."
        )
        if self.args.nonfinite_policy == "stop":
            raise NonFiniteLossError(
                f"{message} Training stopped before updating on it. Check the teacher (dtype overflow, e.g. fp16), "
                "the learning rate, or set `nonfinite_policy='skip'` to skip such micro-batches."
            )
        warnings.warn(f"{message} Skipped (`nonfinite_policy='skip'`): it contributes zero loss.", stacklevel=2)
        self._metrics["train" if self.model.training else "eval"]["opd/skipped_nonfinite"].append(1.0)
        return False
