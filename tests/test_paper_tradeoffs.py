"""`benchmarks/paper_tradeoffs.py`: its table and plot from a report, without training (the runs themselves are the
benchmark's job; one objective's run is exercised by the toy world's tests and the trainer's)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("paper_tradeoffs", ROOT / "benchmarks" / "paper_tradeoffs.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def _run(step: int, seconds: float, avg: float) -> dict:
    metrics = {"avg_at_k": avg, "pass_at_k": min(1.0, 2 * avg), "student_entropy": 0.1, "mean_length": 90.0}
    return {"history": [{"step": step, "train_seconds": seconds, "truncation_rate": 0.0, **metrics}]}


def test_table_reports_mean_and_spread_over_seeds_and_the_plot_is_written(benchmark, tmp_path):
    pytest.importorskip("matplotlib")
    report = {
        "settings": {"steps": 10, "seeds": [0, 1], "n_eval": 4, "k": 2},
        "teacher": {"avg_at_k": 0.9},
        "before": {"avg_at_k": 0.1},
        "equal_steps": {
            benchmark.DEFAULT: [_run(10, 20.0, 0.5), _run(10, 22.0, 0.7)],
            "teacher prefixes, forward KL": [_run(10, 30.0, 0.4), _run(10, 30.0, 0.4)],
        },
        "equal_time": {"teacher prefixes, forward KL": [_run(7, 21.0, 0.3), _run(7, 21.0, 0.3)]},
    }
    rows = benchmark.table(report, "equal_steps").splitlines()
    assert rows[0].startswith("| objective | steps | Avg@2 | Pass@2 |")
    assert rows[2].startswith(f"| {benchmark.DEFAULT} | 10 | 0.600 ± 0.141 | 1.000 ± 0.000 |")
    equal_time = benchmark.table(report, "equal_time").splitlines()
    assert equal_time[2].startswith("| teacher prefixes, forward KL | 7 | 0.300")
    benchmark.plot(report, tmp_path / "plot.png")  # an objective missing from equal_time is drawn as an empty bar
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_every_objective_is_one_of_the_papers_cells_or_the_curriculum(benchmark):
    sources = {settings.get("prefix_source") for settings in benchmark.OBJECTIVES.values()}
    directions = {settings.get("kl_direction") for settings in benchmark.OBJECTIVES.values()}
    assert {"teacher", "student", "dataset"} <= sources and {"forward", "reverse"} <= directions
    assert benchmark.OBJECTIVES[benchmark.DEFAULT] == {}  # the preset's own objective, whatever it is
    assert benchmark.OBJECTIVES[benchmark.CURRICULUM] == {"curriculum": True}


def test_resume_adds_only_the_missing_runs_and_refuses_other_settings(benchmark, tmp_path, monkeypatch):
    out = tmp_path / "report.json"
    asked = []

    def fake_child(target, **kwargs):
        if target is benchmark._reference:
            return {"teacher": {"avg_at_k": 0.9}, "before": {"avg_at_k": 0.1}}
        asked.append((kwargs["seed"], kwargs["steps"]))
        return _run(kwargs["steps"], 10.0 * kwargs["steps"], 0.5)

    monkeypatch.setattr(benchmark, "run_in_child", fake_child)
    monkeypatch.setattr(benchmark, "plot", lambda report, path: None)
    common = ["--out", str(out), "--steps", "4", "--n_eval", "2", "--objectives", benchmark.DEFAULT, "--no_equal_time"]
    monkeypatch.setattr(sys, "argv", ["paper_tradeoffs.py", *common, "--seeds", "0"])
    benchmark.main()
    monkeypatch.setattr(sys, "argv", ["paper_tradeoffs.py", *common, "--seeds", "0", "1", "--resume"])
    benchmark.main()
    assert asked == [(0, 4), (1, 4)], "a resumed benchmark re-ran a seed it had"
    report = json.loads(out.read_text())
    assert [run["seed"] for run in report["equal_steps"][benchmark.DEFAULT]] == [0, 1]
    assert report["settings"]["seeds"] == [0, 1]
    other_steps = [*common[:3], "8", *common[4:]]
    monkeypatch.setattr(sys, "argv", ["paper_tradeoffs.py", *other_steps, "--seeds", "2", "--resume"])
    with pytest.raises(ValueError, match="steps"):
        benchmark.main()
