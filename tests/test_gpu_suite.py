"""`benchmarks/gpu_suite.py`: the CPU smoke run that keeps the GPU suite from rotting, and its refusal to run the
full suite without CUDA."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
TRAINER_CELLS = ["support_full", "support_teacher_topk", "support_sampled_token", "lora"]
GPU_ONLY_CELLS = ["zero3", "fsdp2", "qlora"]
CELLS = [*TRAINER_CELLS[:3], "zero3", "fsdp2", "lora", "qlora", "loss_teacher_topk"]


def run_suite(*arguments: str, **environment: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SUITE), *arguments],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, **environment},
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    folder = tmp_path_factory.mktemp("gpu_suite")
    completed = run_suite("--smoke", "--out", str(folder / "x.json"), "--docs", str(folder / "bench.md"))
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads((folder / "x.json").read_text()), (folder / "bench.md").read_text()


def _assert_measured(run: dict) -> None:
    assert run["status"] == "ok", run
    assert math.isfinite(run["seconds"]) and run["seconds"] > 0
    assert run["peak_bytes"] > 0


@pytest.mark.slow
def test_smoke_run_measures_opd_and_trl_in_every_cell_that_runs_on_cpu(smoke):
    report, _ = smoke
    assert report["device"] == "CPU smoke" and report["smoke"] is True
    assert list(report["cells"]) == CELLS
    for name in [*TRAINER_CELLS, "loss_teacher_topk"]:
        cell = report["cells"][name]
        assert cell["status"] == "ok", (name, cell)
        for side in ("opd", "trl"):
            _assert_measured(cell[side])
        assert cell["time_ratio"] == pytest.approx(cell["opd"]["seconds"] / cell["trl"]["seconds"])
        assert cell["memory_ratio"] == pytest.approx(cell["opd"]["peak_bytes"] / cell["trl"]["peak_bytes"])
    for name in TRAINER_CELLS:  # one warm-up step, then the timed one
        assert all(len(report["cells"][name][side]["step_times"]) == 2 for side in ("opd", "trl"))
    # DistillationTrainer runs once and is the reference of every support
    assert len({json.dumps(report["cells"][name]["trl"]) for name in TRAINER_CELLS[:3]}) == 1
    assert report["cells"]["support_full"]["opd"] != report["cells"]["support_teacher_topk"]["opd"]


@pytest.mark.slow
def test_smoke_run_skips_gpu_only_cells_with_a_reason_and_writes_the_table(smoke):
    report, table = smoke
    for name in GPU_ONLY_CELLS:
        assert report["cells"][name] == {"status": "skipped", "reason": "needs CUDA"}
    assert table.lstrip().startswith("### GPU suite — CPU smoke (torch ")
    assert "| cell | setup | OPD time (s) | TRL time (s) | time OPD/TRL |" in table
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert set(CELLS) <= set(rows)
    assert all("skipped: needs CUDA" in rows[name] for name in GPU_ONLY_CELLS)
    assert "skipped" not in "".join(rows[name] for name in TRAINER_CELLS)


def test_without_cuda_the_full_suite_refuses_and_names_smoke(tmp_path):
    out, docs = tmp_path / "x.json", tmp_path / "bench.md"
    completed = run_suite("--out", str(out), "--docs", str(docs), CUDA_VISIBLE_DEVICES="")
    assert completed.returncode != 0
    assert "--smoke" in completed.stderr
    assert not out.exists() and not docs.exists()
