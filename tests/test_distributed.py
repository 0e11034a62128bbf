"""Two processes under `accelerate launch` (gloo on CPU): every rank draws the same prefix source, losses finite."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("loss_support", ["full", "teacher_topk"])
def test_two_processes_agree_on_the_mixed_draw(tmp_path, loss_support):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    command = [
        accelerate,
        "launch",
        "--config_file",
        str(ROOT / "configs/accelerate/cpu_2proc.yaml"),
        "--main_process_port",
        str(29500 + os.getpid() % 1000),
        str(ROOT / "tests/distributed/run_opd.py"),
        "--out",
        str(tmp_path),
        "--loss_support",
        loss_support,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["student_prefix"] == ranks[1]["student_prefix"] == [1.0, 0.0]
    assert all(r["finite"] and len(r["losses"]) == 2 for r in ranks)
