"""Where the completions come from: the prefix source of each generation batch, and the completions it writes.

Student prefixes are TRL's own generation (HF `generate` or vLLM); teacher prefixes run the same HF code on the
teacher at its temperature; dataset prefixes are the tokenised `completion` column. `PrefixWriter` is what the
trainer's one generation override asks for a batch's completions; the rest are pure functions: the seeded per-batch
draw of `prefix_source="mixed"` and the tokenisation of dataset completions (also the gold-SFT term's targets).
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from trl.trainer.utils import pad


def draw_prefix_source(
    prefix_source: str, off_policy_source: str, student_prefix_fraction: float, seed: int, draw_index: int
) -> str:
    """The source of one generation batch: 'student', 'teacher' or 'dataset'.

    Under "mixed", the student is drawn with probability `student_prefix_fraction` (GKD's λ) from a generator seeded
    by `(seed, draw_index)` alone: every rank draws the same source without communicating, and a run resumed at the
    same step draws what the uninterrupted run drew.
    """
    if prefix_source != "mixed":
        return prefix_source
    if random.Random(f"trl-opd/{seed}/{draw_index}").random() < student_prefix_fraction:
        return "student"
    return off_policy_source


def _is_conversational(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def dataset_completion_ids(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[dict[str, Any]],
    completion: str | list[dict[str, Any]],
    prompt_ids: Sequence[int],
    eos_token_ids: Sequence[int],
    max_length: int | None,
    **chat_template_kwargs: Any,
) -> list[int]:
    """Token ids of a dataset completion, as the model would have generated them after `prompt_ids`.

    Conversational rows render `prompt + completion` with the chat template and keep what follows the prompt's own
    rendering (`add_generation_prompt=True`) up to and including the first EOS, which requires a prefix-preserving
    template. Plain-text rows tokenise the completion without special tokens and append the EOS. Both are cut to
    `max_length`, like generation (a cut completion has no EOS).
    """
    if _is_conversational(prompt) != _is_conversational(completion):
        raise ValueError(
            "A row mixes formats: `prompt` and `completion` must both be conversational (lists of messages) or both "
            "plain strings."
        )
    if _is_conversational(prompt):
        full_ids = tokenizer.apply_chat_template(
            list(prompt) + list(completion), tokenize=True, return_dict=True, **chat_template_kwargs
        )["input_ids"]
        if list(full_ids[: len(prompt_ids)]) != list(prompt_ids):
            raise ValueError(
                "The chat template renders the prompt differently once the completion follows it, so the dataset "
                "completion cannot be cut out of the conversation. Use a prefix-preserving chat template, or give "
                "plain-text `prompt`/`completion` columns."
            )
        ids = list(full_ids[len(prompt_ids) :])
        ends = [i for i, token in enumerate(ids) if token in eos_token_ids]
        if ends:
            ids = ids[: ends[0] + 1]
    else:
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos_token_ids[0]]
    return ids if max_length is None else ids[:max_length]


def padded_completions(
    completions: list[list[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and their mask, as TRL pads completions."""
    tensors = [torch.tensor(ids, dtype=torch.long) for ids in completions]
    ids = pad(tensors, padding_value=pad_token_id, padding_side="right").to(device)
    mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="right").to(device)
    return ids, mask


class PrefixWriter:
    """Writes the completions of each generation batch from the source drawn for it.

    `trainer` is the `OPDTrainer`: teacher prefixes temporarily put the teacher in the four places TRL's HF
    generation path reads (`model_wrapped`, `use_vllm`, `generation_config`, `generation_kwargs`), so teacher samples
    get exactly the student's settings, gathering and EOS handling, at the teacher's temperature.
    """

    def __init__(self, trainer: Any) -> None:
        self._trainer = trainer
        self.source = "student"
        self._rows: list[dict[str, Any]] | None = None

    @contextlib.contextmanager
    def batch(self, source: str, rows: list[dict[str, Any]]) -> Iterator[None]:
        """While TRL builds the generation batch of dataset `rows`, write its completions from `source`."""
        self.source, self._rows = source, rows
        try:
            yield
        finally:
            self.source, self._rows = "student", None

    def write(self, prompt_ids: list[list[int]], generate: Callable[[], list[list[int]]]) -> list[list[int]]:
        """The completions for `prompt_ids`; `generate` is TRL's generation of them by the model in place."""
        self.sync_generation_knobs()
        if self.source == "dataset":
            return self._dataset_completions(prompt_ids)
        if self.source == "teacher":
            with self._teacher_generates():
                return generate()
        return generate()

    def sync_generation_knobs(self) -> None:
        """Push `args.temperature`/`args.max_completion_length` into TRL's cached generation settings.

        TRL copies both into its generation config (and vLLM sampler) at construction; callbacks (schedules, the
        length curriculum) change `args`, so the copies are refreshed before every generation, on every rank alike.
        """
        trainer = self._trainer
        temperature, max_length = trainer.args.temperature, trainer.args.max_completion_length
        trainer.temperature, trainer.max_completion_length = temperature, max_length
        trainer.generation_kwargs.update(temperature=temperature, max_new_tokens=max_length)
        trainer.generation_config.temperature, trainer.generation_config.max_new_tokens = temperature, max_length
        if trainer.use_vllm:
            trainer.vllm_generation.temperature = temperature
            trainer.vllm_generation.max_completion_length = max_length

    def _dataset_completions(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        if self._rows is None or "completion" not in self._rows[0]:
            raise ValueError(
                "Dataset prefixes need a `completion` column in every row of the train dataset (gold solutions), or "
                "`prefix_source='student'`/'teacher'."
            )
        return dataset_completions(self._trainer, self._rows, prompt_ids)

    @contextlib.contextmanager
    def _teacher_generates(self) -> Iterator[None]:
        trainer = self._trainer
        temperature = trainer.args.resolved_teacher_temperature
        saved = (trainer.model_wrapped, trainer.use_vllm, trainer.generation_config, trainer.generation_kwargs)
        generation_config = copy.deepcopy(trainer.generation_config)
        generation_config.temperature = temperature
        trainer.model_wrapped, trainer.use_vllm = trainer.teacher_model, False
        trainer.generation_config = generation_config
        trainer.generation_kwargs = {**trainer.generation_kwargs, "temperature": temperature}
        try:
            yield
        finally:
            trainer.model_wrapped, trainer.use_vllm, trainer.generation_config, trainer.generation_kwargs = saved


def dataset_completions(trainer: Any, rows: list[dict[str, Any]], prompt_ids: list[list[int]]) -> list[list[int]]:
    """`dataset_completion_ids` of each row after its prompt ids, with the trainer's tokenizer, EOS ids, length cap
    and chat-template arguments."""
    return [
        dataset_completion_ids(
            trainer._tokenizer,
            row["prompt"],
            row["completion"],
            ids,
            trainer.eos_token_ids,
            trainer.args.max_completion_length,
            **trainer.chat_template_kwargs,
        )
        for row, ids in zip(rows, prompt_ids, strict=True)
    ]
