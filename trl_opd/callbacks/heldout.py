"""Held-out prompts for the callbacks that sample: where they come from, and the student's entropy on them.

`sampled_entropy` measures the quantity the entropy-gated curriculum compares with its gate (docs/concepts.md): the
student samples completions for held-out prompts, and the entropy of its own next-token distribution is averaged over
every sampled completion token (the EOS included, padding after it excluded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import reduce
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from ..rollouts import completion_mask, eos_token_ids, sampling_context


def _is_dataset_dict(source: Any) -> bool:
    return isinstance(source, Mapping) and any(hasattr(value, "column_names") for value in source.values())


def held_out_columns(eval_prompts: Any, eval_dataset: Any, columns: Sequence[str], owner: str) -> dict[str, list]:
    """The held-out set as lists of `columns`: from `eval_prompts`, else from the trainer's `eval_dataset`.

    `eval_prompts` is a sequence of prompts (conversational message lists or strings; only when `columns` is just
    `("prompt",)`, e.g. `dataset["prompt"]`), or a `Dataset`/dict of columns holding `columns`.
    """
    source = eval_prompts if eval_prompts is not None else eval_dataset
    where = "`eval_prompts`" if eval_prompts is not None else "the trainer's `eval_dataset`"
    needed = ", ".join(f"`{column}`" for column in columns)
    if source is None:
        raise ValueError(
            f"{owner} needs held-out prompts: pass `eval_prompts` (a dataset or dict with columns {needed}"
            f"{' or a list of prompts' if list(columns) == ['prompt'] else ''}) or give the trainer an `eval_dataset` "
            "with those columns."
        )
    if _is_dataset_dict(source):
        raise ValueError(
            f"{where} holds several datasets ({list(source)}); pass the held-out set to {owner} as `eval_prompts`."
        )
    if isinstance(source, str):
        raise ValueError(f"{where} must be a list of prompts or a dataset, got the string {source!r}.")
    if hasattr(source, "column_names") or isinstance(source, Mapping):
        present = source.column_names if hasattr(source, "column_names") else list(source)
        missing = [column for column in columns if column not in present]
        if missing:
            raise ValueError(f"{where} has no {', '.join(f'`{c}`' for c in missing)} column, needed by {owner}.")
        data = {column: list(source[column]) for column in columns}
    else:
        if list(columns) != ["prompt"]:
            raise ValueError(f"{owner} needs columns {needed}: pass {where} as a dataset or dict of columns.")
        data = {"prompt": list(source)}
    if not data[columns[0]]:
        raise ValueError(f"{where} is empty: {owner} needs at least one held-out prompt.")
    return data


class EntropyRecorder(LogitsProcessor):
    """Records, at each generation step, the entropy of softmax(scores / temperature) per row; returns scores as is.

    Custom processors run before the sampling warpers (temperature, top-k, top-p), so the recorded distribution is
    the student's full next-token distribution at `temperature`, before any truncation.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.entropies: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        self.entropies.append(torch.special.entr(probs).sum(dim=-1))
        return scores


@torch.no_grad()
def sampled_entropy(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
) -> tuple[float, int]:
    """Sample one completion per prompt (one left-padded batch) and return (Σ entropy, number of tokens).

    The entropy at completion position t is H(q_θ(·|x, y_<t)) = −Σ_v q_θ(v) log q_θ(v) at `temperature`, in nats,
    summed over every sampled token up to and including the EOS. Sampling uses the training rollouts' settings and
    is seeded with `seed` without touching the global RNG stream; the model is put in eval mode meanwhile
    (`rollouts.sampling_context`).
    """
    device = next(model.parameters()).device
    width = max(map(len, prompt_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    eos_ids = eos_token_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        pad_token_id=pad,
        eos_token_id=eos_ids,
        disable_compile=True,
    )
    recorder = EntropyRecorder(temperature)
    with sampling_context([model], seed):
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder]),
        )
    completion_ids = output[:, width:]
    entropies = torch.stack(recorder.entropies, dim=1)[:, : completion_ids.shape[1]]
    mask = completion_mask(completion_ids, eos_ids)
    return float(entropies[mask].sum()), int(mask.sum())


def sum_over_processes(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over all processes (identity with one process), identical on every rank."""
    if PartialState().num_processes == 1:
        return list(values)
    return reduce(torch.tensor(list(values), dtype=torch.float64, device=device), reduction="sum").tolist()
