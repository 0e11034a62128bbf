"""The teacher the loss asks, built from `OPDTrainer`'s `teacher_model`.

- None: the teacher top-k cached in the train dataset (`teacher_cache.CachedTeacher`);
- an http(s) URL: a served teacher, checked at start-up (`served_teacher.ServedTeacher`);
- a model or a model id/path: the one TRL loaded and prepared as `trainer.teacher_model` (`teachers.LocalTeacher`);
- a dict {name: any of the last two}: one teacher per row (`teacher_routing.TeacherRouter`), local ones loaded and
  prepared here the way TRL does its single teacher.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import PreTrainedModel
from trl.models import prepare_deepspeed
from trl.trainer.utils import create_model_from_path

from .served_teacher import ServedTeacher, TeacherServerClient, is_served
from .teacher_cache import CachedTeacher
from .teacher_routing import TeacherRouter
from .teachers import LocalTeacher, Teacher
from .validation import vocab_size


def build_teacher(trainer: Any, teacher_model: Any, vocabulary: int) -> Teacher:
    """The teacher for `teacher_model` as `OPDTrainer.__init__` received it; `vocabulary` is the student's."""
    if teacher_model is None:
        return CachedTeacher()
    if not isinstance(teacher_model, Mapping):
        return _one_teacher(trainer, teacher_model, vocabulary, trainer.teacher_model)
    teachers = {}
    for name, teacher in teacher_model.items():
        prepared = None if is_served(teacher) else load_local_teacher(trainer, teacher)
        size = None if prepared is None else vocab_size(trainer.accelerator.unwrap_model(prepared))
        if size is not None and size != vocabulary:
            raise ValueError(
                f"Teacher {name!r} has a vocabulary of {size} entries but the student's has {vocabulary}: use "
                "teachers from the student's model family."
            )
        teachers[name] = _one_teacher(trainer, teacher, vocabulary, prepared)
    return TeacherRouter(teachers, trainer.args.teacher_column)


def _one_teacher(trainer: Any, teacher_model: Any, vocabulary: int, prepared: torch.nn.Module | None) -> Teacher:
    """The server at a URL (checked at start-up), or a `prepared` local model."""
    if not is_served(teacher_model):
        return LocalTeacher(prepared, trainer.accelerator.unwrap_model, trainer.hidden_states)
    args = trainer.args
    client = TeacherServerClient(
        teacher_model, timeout=args.teacher_request_timeout, max_retries=args.teacher_max_retries
    )
    teacher = ServedTeacher(client, trainer._tokenizer, vocabulary)
    teacher.check(args.resolved_teacher_temperature)
    return teacher


def load_local_teacher(trainer: Any, teacher: str | PreTrainedModel) -> torch.nn.Module:
    """One local teacher of a dict, loaded and prepared the way `trl.DistillationTrainer.__init__` does its single
    `teacher_model`: from `args.teacher_model_init_kwargs` when given as an id/path, then `prepare_deepspeed` under
    DeepSpeed or `accelerator.prepare_model(evaluation_mode=True)` otherwise (DDP, FSDP, one process)."""
    args = trainer.args
    if isinstance(teacher, str):
        kwargs = dict(args.teacher_model_init_kwargs or {})
        dtype = kwargs.get("dtype")
        kwargs["dtype"] = dtype if dtype in ("auto", None) else getattr(torch, dtype)
        if args.teacher_model_revision is not None:
            kwargs.setdefault("revision", args.teacher_model_revision)
        if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
            kwargs["device_map"] = None
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        teacher = create_model_from_path(teacher, **kwargs)
    if trainer.is_deepspeed_enabled:
        return prepare_deepspeed(teacher, trainer.accelerator)
    return trainer.accelerator.prepare_model(teacher, evaluation_mode=True)
