"""README.md's Python snippet runs offline as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_snippet_trains(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md lost its Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == namespace["args"].max_steps
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))
