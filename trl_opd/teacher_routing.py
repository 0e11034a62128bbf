"""Several teachers, each row distilled from the teacher it names.

With `teacher_model={name: teacher}` (each a model, a model id/path or the URL of a served teacher) every dataset row
names its teacher in the column `OPDConfig.teacher_column`; rows of one batch may name different teachers. The
trainer records each row's teacher as an index (`TEACHER_INDEX`, carried through TRL's batch splitting like the
completions), `TeacherRouter` asks every teacher about the loss positions of its own rows and answers with a
`teachers.RoutedAnswer`, and the objective evaluates each part against its teacher.

Every rank asks every teacher, in the same order, even about no position: a local teacher's forward is a collective
under ZeRO-3 or FSDP. A served teacher is only sent its own rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .teachers import RoutedAnswer, Teacher

TEACHER_INDEX = "teacher_index"  # (B,) key of the generation batch: each row's position in `TeacherRouter.names`


def unknown_teacher_error(column: str, value: Any, names: Sequence[str], where: str) -> ValueError:
    """The error for a row that names no available teacher."""
    return ValueError(
        f"{where} names teacher {value!r} in column {column!r}, but the teachers are {list(names)}. Give every row "
        f"one of these names in {column!r} (`OPDConfig.teacher_column`), or add the teacher to `teacher_model`."
    )


def check_teacher_column(dataset: Any, column: str, names: Sequence[str], split: str) -> None:
    """Fail fast on a dataset without the teacher column or with a row naming an unknown teacher.

    An in-memory `datasets.Dataset` is checked whole; an `IterableDataset` (no `column_names` to read) is checked as
    its batches arrive (`TeacherRouter.indices`).
    """
    if dataset is None or getattr(dataset, "column_names", None) is None:
        return
    if column not in dataset.column_names:
        raise ValueError(
            f"`teacher_model` names several teachers {list(names)}, so every row of the {split} dataset must name its "
            f"teacher in column {column!r} (`OPDConfig.teacher_column`); its columns are {dataset.column_names}."
        )
    for value in dataset.unique(column):
        if value not in names:
            raise unknown_teacher_error(column, value, names, f"A row of the {split} dataset")


class TeacherRouter:
    """`teachers.Teacher` over several named teachers: each loss position is answered by its row's teacher."""

    def __init__(self, teachers: Mapping[str, Teacher], column: str) -> None:
        self.teachers = dict(teachers)
        self.names = tuple(self.teachers)
        self.column = column

    def indices(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Each row's teacher as its position in `names`; a row naming no teacher fails, naming those available."""
        indices = []
        for row in rows:
            value = row.get(self.column)
            if value not in self.teachers:
                raise unknown_teacher_error(self.column, value, self.names, "A row of the batch")
            indices.append(self.names.index(value))
        return indices

    def at_positions(self, inputs: dict[str, Any], mask: torch.Tensor, temperature: float, top_k: int) -> RoutedAnswer:
        """Each teacher at the masked positions of its rows (`inputs[TEACHER_INDEX]`)."""
        owner = inputs[TEACHER_INDEX].to(mask.device)
        position_owner = owner[mask.nonzero()[:, 0]]
        parts = []
        for k, (name, teacher) in enumerate(self.teachers.items()):
            answer = teacher.at_positions(inputs, mask & (owner == k)[:, None], temperature, top_k)
            parts.append((name, (position_owner == k).nonzero().flatten(), answer))
        return RoutedAnswer(tuple(parts))
