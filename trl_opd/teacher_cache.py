"""The off-policy corner without a live teacher: the teacher's top-k stored once in the dataset.

`cache_teacher_topk` runs the teacher (a local model, a model id/path, or a served URL) once over each row's prompt +
`completion`, tokenised exactly as the trainer's dataset prefixes are, and returns the dataset with its top-k ids
and log-probabilities per completion token (and the log-prob of the token itself) in the columns `CACHE_COLUMNS`.
`OPDTrainer(teacher_model=None, ...)` with `prefix_source="dataset"` then reads them through `CachedTeacher`, the
same seam as a served teacher: `loss_support` `teacher_topk` (± tail) or `sampled_token`, any direction. The cache is
an ordinary `datasets.Dataset`: `save_to_disk`/`push_to_hub` it like any other.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedModel

from .prefixes import dataset_completion_ids
from .rollouts import eos_token_ids, tokenize_prompts, tokenizer_of
from .served_teacher import TeacherServerClient, is_served
from .teachers import TeacherTopK

IDS, LOG_PROBS, TOKEN_LOG_PROBS = "teacher_topk_ids", "teacher_topk_log_probs", "teacher_token_log_probs"
COMPLETION_IDS, TEMPERATURE = "teacher_completion_ids", "teacher_temperature"
CACHE_COLUMNS = (IDS, LOG_PROBS, TOKEN_LOG_PROBS, COMPLETION_IDS, TEMPERATURE)


def has_cache(dataset: Any) -> bool:
    """Whether `dataset` carries the columns `cache_teacher_topk` writes."""
    columns = getattr(dataset, "column_names", None) or []
    return all(column in columns for column in CACHE_COLUMNS)


@torch.no_grad()
def _local_topk(model: PreTrainedModel, sequence: list[int], prompt_length: int, top_k: int, temperature: float):
    """(top-k ids, their log-probs, the log-prob of each completion token) of `model` on `sequence`'s completion."""
    device = next(model.parameters()).device
    logits = model(torch.tensor([sequence], device=device)).logits[0, prompt_length - 1 : -1].float()
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    top = log_probs.topk(top_k, dim=-1)
    tokens = torch.tensor(sequence[prompt_length:], device=device).unsqueeze(-1)
    return top.indices.tolist(), top.values.tolist(), log_probs.gather(-1, tokens).squeeze(-1).tolist()


def cache_teacher_topk(
    dataset: Dataset,
    teacher_model: str | PreTrainedModel,
    processing_class: Any,
    top_k: int = 32,
    *,
    temperature: float = 1.0,
    max_completion_length: int | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    batch_size: int = 16,
    **model_init_kwargs: Any,
) -> Dataset:
    """`dataset` with the teacher's top-`top_k` next-token log-probabilities at every token of its `completion`.

    Each row's `prompt` + `completion` is tokenised like the trainer's dataset prefixes (the chat template for
    conversational rows, the completion cut after its first EOS and at `max_completion_length`) and scored once, at
    softmax `temperature` (the trainer checks that it trains at the same teacher temperature). `teacher_model` is a
    model, a model id/path (loaded with `model_init_kwargs`) or an http(s) URL of a served teacher. Adds the
    columns `CACHE_COLUMNS`; runs through `Dataset.map` (batched, with a progress bar).
    """
    if temperature <= 0 or top_k < 1:
        raise ValueError(f"Need `top_k` >= 1 and `temperature` > 0, got {top_k} and {temperature}.")
    missing = [column for column in ("prompt", "completion") if column not in dataset.column_names]
    if missing:
        raise ValueError(f"The dataset to cache needs `prompt` and `completion` columns; it lacks {missing}.")
    tokenizer = tokenizer_of(processing_class)
    client = TeacherServerClient(teacher_model) if is_served(teacher_model) else None
    model = None
    if client is None:
        model = teacher_model
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, **model_init_kwargs)
        model.eval()
        eos = eos_token_ids(model, tokenizer)
    else:
        eos = [tokenizer.eos_token_id]

    def score(batch: dict[str, list]) -> dict[str, list]:
        prompts = tokenize_prompts(tokenizer, batch["prompt"], chat_template_kwargs)
        completions = [
            dataset_completion_ids(
                tokenizer, prompt, completion, ids, eos, max_completion_length, **(chat_template_kwargs or {})
            )
            for prompt, completion, ids in zip(batch["prompt"], batch["completion"], prompts)
        ]
        sequences = [prompt + completion for prompt, completion in zip(prompts, completions)]
        if client is not None:
            lengths = [len(prompt) for prompt in prompts]
            scored = client.score(sequences, lengths, top_k, temperature)
            rows = [(r["logprob_token_ids"], r["logprobs"], [a[0] for a in r["actual_logprobs"]]) for r in scored]
        else:
            rows = [_local_topk(model, seq, len(p), top_k, temperature) for seq, p in zip(sequences, prompts)]
        return {
            IDS: [row[0] for row in rows],
            LOG_PROBS: [row[1] for row in rows],
            TOKEN_LOG_PROBS: [row[2] for row in rows],
            COMPLETION_IDS: completions,
            TEMPERATURE: [temperature] * len(rows),
        }

    return dataset.map(score, batched=True, batch_size=batch_size, desc="teacher top-k")


def cached_batch(rows: list[dict[str, Any]], completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> dict:
    """The cached columns of a generation batch's `rows`, padded to its (B, T) completions: (B, T, k) ids and
    log-probs, (B, T) token log-probs, and (B,) the temperatures they were scored at. The cached completion tokens
    must be those the trainer wrote (same tokenizer, template, EOS and length cap), else the cache belongs to other
    prefixes."""
    batch, width = completion_ids.shape
    k = len(rows[0][IDS][0]) if rows[0][IDS] else 1
    ids = torch.zeros(batch, width, k, dtype=torch.long)
    log_probs = torch.full((batch, width, k), float("-inf"))
    token_log_probs = torch.full((batch, width), float("-inf"))
    for b, row in enumerate(rows):
        length = int(completion_mask[b].sum())
        written = completion_ids[b, :length].tolist()
        if row[COMPLETION_IDS][:length] != written:
            raise ValueError(
                f"Row {b}'s cached teacher scores are for completion tokens {row[COMPLETION_IDS][:length]}, but the "
                f"trainer's dataset prefix is {written}: rebuild the cache with `cache_teacher_topk` using the "
                "student's tokenizer, chat template and `max_completion_length`."
            )
        ids[b, :length] = torch.tensor(row[IDS][:length], dtype=torch.long).reshape(length, k)
        log_probs[b, :length] = torch.tensor(row[LOG_PROBS][:length], dtype=torch.float32).reshape(length, k)
        token_log_probs[b, :length] = torch.tensor(row[TOKEN_LOG_PROBS][:length], dtype=torch.float32)
    device = completion_ids.device
    return {
        IDS: ids.to(device),
        LOG_PROBS: log_probs.to(device),
        TOKEN_LOG_PROBS: token_log_probs.to(device),
        TEMPERATURE: torch.tensor([row[TEMPERATURE] for row in rows], device=device),
    }


class CachedTeacher:
    """`teachers.Teacher` reading the top-k that `cache_teacher_topk` stored (carried in the batch by the trainer);
    `top_k` is not used: the cache holds what it holds."""

    def at_positions(self, inputs: dict[str, Any], mask: torch.Tensor, temperature: float, top_k: int) -> TeacherTopK:
        cached = inputs[TEMPERATURE].flatten().tolist()
        if any(abs(value - temperature) > 1e-6 for value in cached):
            raise ValueError(
                f"The teacher top-k cache was made at temperature {cached}, but training uses teacher temperature "
                f"{temperature}: rebuild the cache at {temperature}, or set `teacher_temperature` to the cache's."
            )
        return TeacherTopK(  # every cached entry: the loss takes the `loss_top_k` it needs, or says it lacks them
            ids=inputs[IDS][mask],
            log_probs=inputs[LOG_PROBS][mask],
            token_log_probs=inputs[TOKEN_LOG_PROBS][mask],
        )
