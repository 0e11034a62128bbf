"""What every piece that samples from a model shares: prompt tokenisation, EOS ids, completion masks and a seeded,
side-effect-free sampling context.

Used by the trainer (loss masks), `evaluation` (Avg@k, held-out KL) and the callbacks that sample held-out prompts
(the length curriculum's entropy, EffOPD's score), so that all of them read a completion the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch


def tokenizer_of(processing_class: Any) -> Any:
    """The text tokenizer of a tokenizer or a multimodal processor."""
    return getattr(processing_class, "tokenizer", processing_class)


def tokenize_prompts(tokenizer: Any, prompts: list, chat_template_kwargs: dict[str, Any] | None) -> list[list[int]]:
    """Prompt token ids as TRL builds them: conversational prompts through the chat template with the generation
    prompt, plain strings through the tokenizer."""
    if isinstance(prompts[0], str):
        return tokenizer(text=prompts)["input_ids"]
    return tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, tokenize=True, return_dict=True, **(chat_template_kwargs or {})
    )["input_ids"]


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def completion_mask(completion_ids: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """1 on each completion token up to and including its first EOS, 0 on the padding after it."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_ids), device=completion_ids.device)).int()
    return (is_eos.cumsum(dim=1) - is_eos) == 0


@contextlib.contextmanager
def sampling_context(models: Sequence[Any], seed: int | None = None, tokenizer: Any = None) -> Iterator[None]:
    """For the duration: the models in eval mode, the RNG forked from the global state (seeded with `seed` if given)
    and, with a `tokenizer`, left padding; all restored afterwards.

    Sampling inside is reproducible and comparable across calls, and training's own RNG stream is left untouched.
    """
    modes = [model.training for model in models]
    device = next(models[0].parameters()).device
    padding_side = tokenizer.padding_side if tokenizer is not None else None
    for model in models:
        model.eval()
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    try:
        with torch.random.fork_rng(
            devices=[] if device.type == "cpu" else [device.index or 0], device_type=device.type
        ):
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        if tokenizer is not None:
            tokenizer.padding_side = padding_side
        for model, mode in zip(models, modes):
            model.train(mode)
