"""Where the completions come from: the prefix source of each generation batch, and the completions it writes.

Student prefixes are TRL's own generation (HF `generate` or vLLM); teacher prefixes run the same HF code on a local
teacher at its temperature, or are sampled by a served teacher's server, and with several teachers each row's prompt
is continued by its own teacher; dataset prefixes are the tokenised `completion` column. `PrefixWriter` is what the
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

from .served_teacher import ServedTeacher
from .teacher_routing import TeacherRouter
from .teachers import LocalTeacher

Generate = Callable[[list[int]], list[list[int]]]  # TRL's generation of the prompts at these row indices


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

    `trainer` is the `OPDTrainer`: teacher prefixes from a local teacher temporarily put it in the four places TRL's
    HF generation path reads (`model_wrapped`, `use_vllm`, `generation_config`, `generation_kwargs`), so teacher
    samples get exactly the student's settings, gathering and EOS handling, at the teacher's temperature.
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

    def write(self, prompt_ids: list[list[int]], generate: Generate) -> list[list[int]]:
        """The completions for `prompt_ids`; `generate(rows)` is TRL's generation of `prompt_ids[rows]` by the model
        in place."""
        self.sync_generation_knobs()
        if self.source == "dataset":
            return self._dataset_completions(prompt_ids)
        every_row = list(range(len(prompt_ids)))
        if self.source != "teacher":
            return generate(every_row)
        teacher = self._trainer.teacher
        if not isinstance(teacher, TeacherRouter):
            return self._teacher_completions(teacher, prompt_ids, every_row, generate)
        owners = teacher.indices(self._rows)
        completions: list[list[int]] = [[] for _ in prompt_ids]
        for k, one in enumerate(teacher.teachers.values()):
            rows = [i for i, owner in enumerate(owners) if owner == k]
            if not rows and not isinstance(one, LocalTeacher):
                continue
            # A local teacher generates on every rank, on one of its rows if it has none here: under ZeRO-3 or
            # FSDP its parameters are gathered for generation, a collective every rank must enter.
            written = self._teacher_completions(one, prompt_ids, rows or [0], generate)
            for i, completion in zip(rows, written):
                completions[i] = completion
        return completions

    def _teacher_completions(
        self, teacher: Any, prompt_ids: list[list[int]], rows: list[int], generate: Generate
    ) -> list[list[int]]:
        """`teacher`'s completions of `prompt_ids[rows]`: sampled by its server, or by TRL's generation with it."""
        args = self._trainer.args
        if isinstance(teacher, ServedTeacher):
            prompts = [prompt_ids[i] for i in rows]
            temperature = args.resolved_teacher_temperature
            return teacher.generate(prompts, args.max_completion_length, temperature, self._trainer.eos_token_ids)
        with self._teacher_generates(teacher.model):
            return generate(rows)

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
    def _teacher_generates(self, model: torch.nn.Module) -> Iterator[None]:
        trainer = self._trainer
        temperature = trainer.args.resolved_teacher_temperature
        saved = (trainer.model_wrapped, trainer.use_vllm, trainer.generation_config, trainer.generation_kwargs)
        generation_config = copy.deepcopy(trainer.generation_config)
        generation_config.temperature = temperature
        trainer.model_wrapped, trainer.use_vllm = model, False
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
