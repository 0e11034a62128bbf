"""Two processes under `accelerate launch` on CPU: DDP (gloo) and DeepSpeed ZeRO-2/ZeRO-3 (DeepSpeed's CPU
accelerator). Every rank draws the same prefix source, losses are finite, and ZeRO trains the same weights as DDP
for the full, top-k and sampled-token supports."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUPPORTS = ["full", "teacher_topk", "sampled_token"]
pytestmark = pytest.mark.slow


def launch(config: Path, out: Path, port_offset: int) -> list[dict]:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    command = [
        accelerate, "launch", "--config_file", str(config),
        "--main_process_port", str(29500 + (os.getpid() + port_offset) % 1000),
        str(ROOT / "tests/distributed/run_opd.py"), "--out", str(out), "--loss_support", *SUPPORTS,
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return launch(ROOT / "configs/accelerate/cpu_2proc.yaml", tmp_path_factory.mktemp("ddp"), 0)


def test_ddp_ranks_agree_on_the_mixed_draw(ddp):
    assert [rank["world_size"] for rank in ddp] == [2, 2]
    for support in SUPPORTS:
        runs = [rank["runs"][support] for rank in ddp]
        assert runs[0]["student_prefix"] == runs[1]["student_prefix"]
        assert all(run["finite"] and len(run["losses"]) == 2 for run in runs)
    assert ddp[0]["runs"]["full"]["student_prefix"] == [1.0, 0.0]  # seed 4: both sources are exercised


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs the `deepspeed` extra")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_the_same_weights_as_ddp(ddp, tmp_path, stage):
    ranks = launch(ROOT / f"tests/distributed/zero{stage}_cpu.yaml", tmp_path, stage)
    for support in SUPPORTS:
        run, reference = ranks[0]["runs"][support], ddp[0]["runs"][support]
        assert run["zero_stage"] == stage and run["finite"]
        assert ranks[1]["runs"][support]["student_prefix"] == run["student_prefix"] == reference["student_prefix"]
        for name, checksum in reference["checksums"].items():
            assert run["checksums"][name] == pytest.approx(checksum, rel=1e-5, abs=1e-5), (support, name)
