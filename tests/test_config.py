"""`OPDConfig` validation: every bad value fails at construction with a message naming the fix."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from trl import DistillationConfig

from trl_opd import OPDConfig
from trl_opd.config import CHECKPOINTING_FIELD


def config(tmp_path, **kwargs) -> OPDConfig:
    return OPDConfig(output_dir=str(tmp_path), report_to=[], bf16=False, **kwargs)


def test_defaults_are_classic_opd(tmp_path):
    args = config(tmp_path)
    assert isinstance(args, DistillationConfig)
    assert (args.prefix_source, args.kl_direction, args.loss_support) == ("student", "reverse", "full")
    assert args.resolved_teacher_temperature == args.temperature
    assert config(tmp_path, teacher_temperature=0.5).resolved_teacher_temperature == 0.5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prefix_source="students"), "prefix_source.*'student'"),
        (dict(off_policy_source="student"), "off_policy_source"),
        (dict(kl_direction="kl"), "kl_direction"),
        (dict(loss_support="topk"), "loss_support"),
        (dict(nonfinite_policy="ignore"), "nonfinite_policy"),
        (dict(student_prefix_fraction=1.5), r"student_prefix_fraction.*\[0, 1\]"),
        (dict(student_prefix_fraction=-0.1), "student_prefix_fraction"),
        (dict(forward_kl_weight=2.0), "forward_kl_weight"),
        (dict(loss_top_k=0), "loss_top_k"),
        (dict(loss_top_k=2.5), "loss_top_k"),
        (dict(teacher_temperature=0.0), "teacher_temperature"),
        (dict(beta=0.5), "kl_direction='jsd'"),
        (dict(loss_add_tail=True), "top-k support"),
        (dict(loss_support="sampled_token", kl_direction="jsd"), "'reverse'"),
        (
            dict(loss_support="sampled_token", kl_direction="reverse", prefix_source="teacher"),
            "prefix_source='student'",
        ),
        (dict(loss_support="sampled_token", kl_direction="forward"), "'teacher' or 'dataset'"),
        (dict(loss_support="sampled_token", kl_direction="reverse", prefix_source="mixed"), "student"),
    ],
)
def test_bad_values_fail_with_the_fix(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kl_direction="jsd", beta=0.5),
        dict(loss_support="sampled_token", kl_direction="forward", prefix_source="dataset"),
        dict(loss_support="union_topk", loss_add_tail=True, loss_top_k=4),
        dict(prefix_source="mixed", off_policy_source="teacher", student_prefix_fraction=0.25),
        dict(kl_direction="mixed", forward_kl_weight=0.9),
    ],
)
def test_meaningful_combinations_are_accepted(tmp_path, kwargs):
    args = config(tmp_path, **kwargs)
    for key, value in kwargs.items():
        assert getattr(args, key) == value


def test_logged_config_keeps_every_opd_value(tmp_path):
    """`to_dict()` is what `report_to` backends log; transformers redacts any field named `*_token` there (as for
    `hub_token`), so no trl-opd field may end that way or its value would be lost from every run's config."""
    settings = config(tmp_path, kl_direction="mixed", forward_kl_weight=0.8, mask_special_tokens=False)
    logged = settings.to_dict()
    added = {f.name for f in dataclasses.fields(OPDConfig)} - {f.name for f in dataclasses.fields(DistillationConfig)}
    assert added, "OPDConfig adds no fields?"
    assert {name: logged[name] for name in added} == {name: getattr(settings, name) for name in added}


def test_default_config_warns_about_nothing(tmp_path):
    """TRL's default `gradient_checkpointing=True` made every config trip transformers' rename warning, and the
    default pin memory torch's no-accelerator warning at the first batch; an explicit old name still warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = config(tmp_path)
    assert getattr(args, CHECKPOINTING_FIELD) is True, "checkpointing stays on by default, as in TRL"
    assert args.dataloader_pin_memory == torch.accelerator.is_available()
    assert getattr(config(tmp_path, **{CHECKPOINTING_FIELD: False}), CHECKPOINTING_FIELD) is False
    if CHECKPOINTING_FIELD != "gradient_checkpointing":
        with pytest.warns(FutureWarning, match="gradient_checkpointing"):
            assert getattr(config(tmp_path, gradient_checkpointing=False), CHECKPOINTING_FIELD) is False


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({}, "student-reverse"),
        (dict(kl_direction="mixed", forward_kl_weight=0.8), "student-mixed-fkl0.8"),
        (dict(prefix_source="mixed", kl_direction="jsd", beta=0.5), "mixed0.5-dataset-jsd-beta0.5"),
        (dict(prefix_source="teacher", kl_direction="forward"), "teacher-forward"),
        (dict(loss_support="teacher_topk", loss_top_k=8, loss_add_tail=True), "student-reverse-teacher_topk8-tail"),
        (dict(loss_support="sampled_token"), "student-reverse-sampled_token"),
        (dict(ref_kl_coef=0.1, eopd_coef=0.5), "student-reverse-refkl0.1-eopd0.5"),
    ],
)
def test_objective_name_tells_objectives_apart(tmp_path, kwargs, name):
    assert config(tmp_path, **kwargs).objective_name == name
