"""Offline fixtures: the toy chat tokenizer, tiny Qwen2 student/teacher and small prompt datasets."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from trl_opd import OPDConfig  # noqa: E402
from trl_opd.toy import ToyPairConfig, build_model, build_tokenizer  # noqa: E402

# A toy pair that trains in a second: for tests of the wiring around the pair, not of its quality.
TINY_PAIR = ToyPairConfig(
    teacher_hidden_size=24,
    teacher_num_layers=2,
    teacher_steps=3,
    student_hidden_size=16,
    student_num_layers=1,
    student_steps=2,
    num_heads=2,
    batch_size=4,
)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def student(tokenizer):
    return build_model(tokenizer, hidden_size=32, num_layers=1, seed=0)


@pytest.fixture
def teacher(tokenizer):
    return build_model(tokenizer, hidden_size=48, num_layers=2, seed=1)


def make_dataset(n: int = 8, conversational: bool = True) -> Dataset:
    """Prompts 'a+b?' with gold completions 'a+b=c'."""
    prompts, completions = [], []
    for i in range(n):
        a, b = i % 10, (3 * i + 1) % 10
        question, answer = f"{a}+{b}?", f"{a}+{b}={a + b}"
        if conversational:
            prompts.append([{"role": "user", "content": question}])
            completions.append([{"role": "assistant", "content": answer}])
        else:
            prompts.append(question)
            completions.append(" " + answer)
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


@pytest.fixture
def dataset():
    return make_dataset()


def make_config(tmp_path, config_class: type = OPDConfig, **overrides) -> OPDConfig:
    """A small, fast, float32, offline config (an `OPDConfig` unless `config_class` says otherwise); `overrides`
    win."""
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_completion_length=8,
        learning_rate=1e-2,
        bf16=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return config_class(**settings)


def load_example(monkeypatch: pytest.MonkeyPatch):
    """`examples/opd_math.py` as a module (registered in `sys.modules`, where dataclasses resolve its annotations)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "opd_math.py"
    spec = importlib.util.spec_from_file_location("opd_math_example", path)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, example)
    spec.loader.exec_module(example)
    return example
