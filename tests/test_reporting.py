"""`report_to` backends receive trl-opd's `opd/` metrics: TensorBoard, W&B (offline) and trackio (local)."""

from __future__ import annotations

import glob
import json
import sqlite3

import pytest
from conftest import make_config, make_dataset

from trl_opd import OPDTrainer

EXPECTED = ("train/opd/truncation_rate", "train/opd/overlap_ratio", "train/opd/student_entropy")


def train(backend: str, student, teacher, tokenizer, tmp_path) -> None:
    args = make_config(tmp_path / "out", report_to=[backend], max_steps=2, run_name=tmp_path.name)
    trainer = OPDTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=make_dataset(8), processing_class=tokenizer
    )
    trainer.train()


def test_tensorboard_gets_opd_scalars(student, teacher, tokenizer, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train("tensorboard", student, teacher, tokenizer, tmp_path)
    (run,) = glob.glob(str(tmp_path / "out" / "runs" / "*"))
    events = EventAccumulator(run)
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert set(EXPECTED) <= scalars, f"missing {set(EXPECTED) - scalars}"
    assert len(events.Scalars("train/opd/overlap_ratio")) == 2  # logging_steps=1, two steps


def test_wandb_offline_run_records_opd_metrics(student, teacher, tokenizer, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    train("wandb", student, teacher, tokenizer, tmp_path)
    wandb.finish()
    wandb.teardown()  # stops the wandb-core service, which writes the run file asynchronously until then
    (record,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "*.wandb"))
    data = open(record, "rb").read()  # protobuf records: metric names are stored as plain strings
    for name in EXPECTED:
        assert name.encode() in data, f"{name} not in the offline W&B run"


def test_trackio_local_run_records_opd_metrics(student, teacher, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    trackio = pytest.importorskip("trackio")
    train("trackio", student, teacher, tokenizer, tmp_path)
    database = trackio.utils.TRACKIO_DIR / "huggingface.db"  # the project TrainingArguments names by default
    with sqlite3.connect(database) as connection:
        query = "SELECT metrics FROM metrics WHERE run_name = ?"
        rows = [json.loads(row[0]) for row in connection.execute(query, (tmp_path.name,))]
    logged = set().union(*rows)
    assert set(EXPECTED) <= logged, f"missing {set(EXPECTED) - logged}"
