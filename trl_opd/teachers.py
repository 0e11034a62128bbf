"""The teacher seam: what the loss asks a teacher, and the local implementation of the answer.

The objective needs one thing from a teacher: its next-token distribution at the loss positions of a batch. A
`Teacher` answers `at_positions(inputs, mask, temperature, top_k)` with `heads.Positions` (the full distribution, as
hidden states and a head) or `TeacherTopK` (only its top-k, as a served teacher returns it); the objective never sees
where the answer came from. `LocalTeacher` is a model held beside the student (prepared by TRL for DDP, DeepSpeed or
FSDP): its last hidden states at those positions and its output head, from which the loss projects logits chunk by
chunk. A teacher served elsewhere (`trl_opd.served_teacher.ServedTeacher`), cached in the dataset or chosen per row
plugs in here, without touching the objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .heads import OutputHead, Positions
from .hidden_states import MULTIMODAL_KEYS, HiddenStates

ROW_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")  # what a teacher forward reads per row


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher at N positions given only by its top-k, as a served or cached teacher returns it.

    `ids` (N, k) and `log_probs` (N, k): the k most likely tokens and their log-probabilities under the teacher's
    full softmax at its temperature, sorted by descending probability and padded with −inf; `token_log_probs` (N,):
    the log-probability of the prefix token at each position (−inf where unknown).
    """

    ids: torch.Tensor
    log_probs: torch.Tensor
    token_log_probs: torch.Tensor

    def nonfinite(self) -> bool:
        """NaN or +inf anywhere (−inf is padding, not an error)."""
        values = torch.cat([self.log_probs.flatten(), self.token_log_probs.flatten()])
        return bool(torch.isnan(values).any() or torch.isposinf(values).any())


Answer = Positions | TeacherTopK


@dataclass(frozen=True)
class RoutedAnswer:
    """Several teachers at the N loss positions of a batch whose rows name their teacher.

    `parts` holds, per teacher in a fixed order, (name, index, answer): `index` (n,) are the loss positions (among the
    N, ascending) of that teacher's rows and `answer` its `Positions` or `TeacherTopK` there, in the same order.
    """

    parts: tuple[tuple[str, torch.Tensor, Answer], ...]


class Teacher(Protocol):
    """Anything that tells the loss what the teacher predicts at the loss positions of a batch."""

    def at_positions(
        self, inputs: dict[str, Any], mask: torch.Tensor, temperature: float, top_k: int
    ) -> Positions | TeacherTopK:
        """The teacher at the completion positions where `mask` (B, T) is True, at softmax `temperature`.

        A teacher that can only report its top-k (a served one) returns `TeacherTopK` with `top_k` entries per
        position; a local one returns its whole distribution as `Positions` and ignores `top_k`.
        """
        ...


class LocalTeacher:
    """A teacher model in this process: `model` as prepared by TRL (`DistillationTrainer.teacher_model`)."""

    def __init__(self, model: torch.nn.Module, unwrap: Any, hidden_states: HiddenStates) -> None:
        self.model = model
        self._unwrap = unwrap
        self._hidden_states = hidden_states

    def at_positions(self, inputs: dict[str, Any], mask: torch.Tensor, temperature: float, top_k: int) -> Positions:
        """The teacher's hidden states at `mask` and its head at `temperature` (the whole distribution: no `top_k`).

        The forward runs over the rows with a masked position only (all rows for multimodal inputs, whose fields are
        not split per row), and over one row when none has: under ZeRO-3 or FSDP the forward is a collective, which
        every rank must enter as often as the others.
        """
        unwrapped = self._unwrap(self.model)
        rows = mask.any(dim=1)
        if bool(rows.all()) or any(key in inputs for key in MULTIMODAL_KEYS):
            hidden = self._hidden_states.frozen(self.model, unwrapped, inputs).to(mask.device)[mask]
        else:
            keep = (
                rows.nonzero().flatten() if bool(rows.any()) else torch.zeros(1, dtype=torch.long, device=mask.device)
            )
            subset = {key: inputs[key][keep.to(inputs[key].device)] for key in ROW_KEYS}
            hidden = self._hidden_states.frozen(self.model, unwrapped, subset).to(mask.device)[mask[keep]]
        return Positions(hidden, OutputHead.from_model(unwrapped, temperature))
