"""Last hidden states at the completion positions, read through TRL's own helper.

The loss never asks a model for (B, T, V) logits: it takes the backbone's last hidden states at the positions that
predict each completion token (TRL's `DistillationTrainer._get_last_hidden_state`) and projects them itself, chunk
by chunk (`trl_opd.chunked`). Frozen models (the teacher, the reference) run without gradient and through TRL's
`_forward_redirection`, so that FSDP and DeepSpeed materialise their sharded parameters for the forward.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from trl import DistillationTrainer

# The multimodal keyword arguments TRL's helper takes after (model, input_ids, attention_mask, logits_to_keep).
MULTIMODAL_KEYS = tuple(inspect.signature(DistillationTrainer._get_last_hidden_state).parameters)[5:]


class HiddenStates:
    """Reads last hidden states of a model at the positions predicting `inputs[ids_key]` after the prompt.

    `last_hidden_state` is the trainer's bound `_get_last_hidden_state`, `forward_redirection` its
    `_forward_redirection`: the two TRL internals every model read goes through.
    """

    def __init__(self, last_hidden_state: Callable[..., torch.Tensor], forward_redirection: Callable[..., Any]):
        self._last_hidden_state = last_hidden_state
        self._forward_redirection = forward_redirection

    @staticmethod
    def _arguments(unwrapped: torch.nn.Module, inputs: dict[str, Any], ids_key: str, mask_key: str):
        input_ids = torch.cat([inputs["prompt_ids"], inputs[ids_key]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs[mask_key]], dim=1)
        multimodal = {key: inputs[key] for key in MULTIMODAL_KEYS if key in inputs}
        return (unwrapped, input_ids, attention_mask, inputs[ids_key].size(1)), multimodal

    def trainable(
        self,
        unwrapped: torch.nn.Module,
        inputs: dict[str, Any],
        ids_key: str = "completion_ids",
        mask_key: str = "completion_mask",
    ) -> torch.Tensor:
        """(B, T, H) hidden states of the student, with gradient (already inside its wrapper's forward)."""
        args, multimodal = self._arguments(unwrapped, inputs, ids_key, mask_key)
        return self._last_hidden_state(*args, **multimodal)

    @torch.no_grad()
    def frozen(
        self,
        model: torch.nn.Module,
        unwrapped: torch.nn.Module,
        inputs: dict[str, Any],
        ids_key: str = "completion_ids",
        mask_key: str = "completion_mask",
    ) -> torch.Tensor:
        """(B, T, H) hidden states of a frozen prepared `model` (unwrapped: `unwrapped`), in eval mode."""
        model.eval()
        args, multimodal = self._arguments(unwrapped, inputs, ids_key, mask_key)
        return self._forward_redirection(model, unwrapped, self._last_hidden_state, *args, **multimodal)
