"""An output head as the loss reads it: the `lm_head` weights and the logit transform a causal LM applies.

The loss never asks a model for (N, V) logits: it keeps hidden states and the head (`Positions`) and projects them
itself, chunk by chunk (`trl_opd.chunked`), reading the head's weights directly. Under ZeRO-3 those reads happen
inside `maybe_gather_lm_head_ctx`; under FSDP2 the sharded head is gathered once with an averaged gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Partial
from trl.trainer.utils import maybe_gather_lm_head_ctx


@dataclass(frozen=True)
class OutputHead:
    """An `lm_head` and the logit transform before the softmax: softcap(scale·(W h + b)) / temperature."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    @classmethod
    def from_model(cls, model: torch.nn.Module, temperature: float) -> OutputHead:
        """Read the head and the logit post-processing a causal LM applies (scale, Gemma-style softcapping)."""
        head = model.get_output_embeddings()
        config = model.config.get_text_config()
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):  # FSDP2: gather the sharded head once
            weight, bias = _full(weight), _full(bias)
        return cls(weight, bias, _logit_scale(config), getattr(config, "final_logit_softcapping", None), temperature)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 transformed logits of `hidden` (n, H) over the whole vocabulary: (n, V)."""
        with maybe_gather_lm_head_ctx(self.weight, self.bias):
            z = hidden.float() @ self.weight.float().t()
            return self._transform(z if self.bias is None else z + self.bias.float())

    def logits_at(self, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """fp32 transformed logits of `hidden` (n, H) at the vocabulary ids `index` (n, K) only: (n, K).

        Gathers the K head rows each position needs and takes K dot products: n·K·H work instead of n·V·H.
        """
        with maybe_gather_lm_head_ctx(self.weight, self.bias):
            rows = self.weight[index].float()  # (n, K, H)
            z = torch.bmm(rows, hidden.float().unsqueeze(-1)).squeeze(-1)
            return self._transform(z if self.bias is None else z + self.bias[index].float())

    def _transform(self, z: torch.Tensor) -> torch.Tensor:
        z = z * self.logit_scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z / self.temperature


@dataclass(frozen=True)
class Positions:
    """A model's next-token distributions at N positions, softmax(`head`(`hidden`)), kept as hidden states (N, H)
    and the head so that the loss projects them chunk by chunk."""

    hidden: torch.Tensor
    head: OutputHead


def _full(parameter: torch.Tensor | None) -> torch.Tensor | None:
    """The whole of an FSDP2-sharded parameter, whose gradient is averaged back onto the shards across ranks.

    `full_tensor()` alone would hand each shard only its own rank's gradient (a replicate placement's backward is a
    local slice), so every rank would update its shard of the head from its own batch only. Averaging matches the
    reduction FSDP applies to every other parameter.
    """
    if parameter is None:
        return None
    return parameter.full_tensor(grad_placements=[Partial("avg")] * parameter.device_mesh.ndim)


def _logit_scale(config) -> float:
    """The multiplier a model applies to its logits (Cohere `logit_scale`, Granite `1/logits_scaling`, ...)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if config.model_type == "hyperclovax" else 1.0 / float(scaling)
    return 1.0
