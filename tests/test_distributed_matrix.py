"""The distributed matrix on CPU: two processes under DDP, ZeRO-2, ZeRO-3 (`zero3_init_flag`, models loaded from
paths) and FSDP2 train each cell of their CI row (`tests/distributed/cells.py`) to the weights of one process on the
same global batch; gradient accumulation k with batch b updates like batch k·b; and a NaN teacher on one rank ends
the same way on every rank, without hanging, under both `nonfinite_policy` values.

One launch per backend runs all its cells (start-up dominates a cell's cost); one single-process run makes every
reference. `scripts/distributed_matrix.py` runs every backend on every cell for a release.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))
import harness  # noqa: E402
from cells import (  # noqa: E402
    ACCUMULATION_BASES,
    ACCUMULATION_CELLS,
    ACCUMULATION_STEPS,
    BACKENDS,
    CELLS,
    CI_CELLS,
    FAULT_CELLS,
    FAULT_RANK,
    FAULT_STEP,
    MAX_STEPS,
    PREFIXES,
    SUPPORTS,
    uncovered,
)

pytestmark = pytest.mark.slow
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
# Wall-clock limits (seconds) of each launch, killed beyond: on an idle 2-core machine the reference (26 cells) takes
# ~20 s, a backend launch (6 cells) 15-25 s, a fault launch 10-40 s; DeepSpeed's first run on a machine also builds its
# shm comm op (~100 s).
REFERENCE_TIMEOUT = 300
MATRIX_TIMEOUT = 300
FAULT_TIMEOUT = 150
FAULT_COLLECTIVE_TIMEOUT = 30  # a rank left alone in a collective fails after this instead of hanging


def backend_param(backend: str, *values: str) -> pytest.param:
    skip = pytest.mark.skipif(backend.startswith("zero") and not HAS_DEEPSPEED, reason="needs the `deepspeed` extra")
    return pytest.param(backend, *values, id="-".join([backend, *values]), marks=skip)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> harness.Launch:
    names = [*CELLS, *ACCUMULATION_CELLS]
    return harness.launch(None, names, tmp_path_factory.mktemp("reference"), timeout=REFERENCE_TIMEOUT)


@pytest.fixture(scope="module")
def backend_run(tmp_path_factory):
    """`backend_run(backend)`: the launch of `backend`'s CI row, started by the first test that needs it."""
    runs: dict[str, harness.Launch] = {}

    def run(backend: str) -> harness.Launch:
        if backend not in runs:
            cells = [cell.name for cell in CI_CELLS[backend]]
            runs[backend] = harness.launch(backend, cells, tmp_path_factory.mktemp(backend), timeout=MATRIX_TIMEOUT)
        return runs[backend]

    return run


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_ci_row_covers_every_feature(backend):
    assert not uncovered(backend)


def test_the_catalogue_covers_every_valid_prefix_support_pair():
    pairs = {(cell.prefix, cell.support) for cell in CELLS.values()}
    assert pairs == {(p, s) for p in PREFIXES for s in SUPPORTS} - {("mixed", "sampled_token")}


@pytest.mark.parametrize(
    "backend,cell", [backend_param(backend, cell.name) for backend in BACKENDS for cell in CI_CELLS[backend]]
)
def test_two_processes_train_the_single_process_weights(backend_run, reference, backend, cell):
    problems = harness.check_cell(backend_run(backend), reference, cell)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("k", ACCUMULATION_STEPS)
@pytest.mark.parametrize("base", ACCUMULATION_BASES, ids=lambda cell: cell.name)
def test_accumulation_k_with_batch_b_updates_like_one_batch_of_k_b(reference, base, k):
    accumulated = replace(base, accumulation=k).name
    results = {name: reference.cell(0, name) for name in (base.name, accumulated)}
    for name, result in results.items():
        assert result is not None and result["status"] == "ok", f"{name}: {result and result.get('traceback')}"
    rows = [[Counter(batch) for batch in result["rows"]] for result in results.values()]
    assert rows[0] == rows[1]
    problems = harness.compare_weights(
        reference.load(accumulated), reference.load(base.name), reference.load("initial")
    )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("policy", ["skip", "stop"])
@pytest.mark.parametrize("backend", [backend_param("ddp"), backend_param("zero3")])
def test_nan_teacher_on_one_rank_ends_alike_on_every_rank(tmp_path, backend, policy):
    cell = FAULT_CELLS[policy].name
    run = harness.launch(backend, [cell], tmp_path, timeout=FAULT_TIMEOUT, collective_timeout=FAULT_COLLECTIVE_TIMEOUT)
    assert run.returncode is not None, harness.describe(run)
    results = [run.cell(rank, cell) for rank in range(2)]
    missing = [rank for rank, result in enumerate(results) if result is None]
    assert not missing, f"ranks {missing} wrote no report (killed mid-run?); {harness.describe(run)}"
    if policy == "skip":
        for rank, result in enumerate(results):
            assert result["status"] == "ok", f"rank {rank} (warned {result['warnings']}): {result.get('traceback')}"
            skipped = [entry.get("opd/skipped_nonfinite", 0) > 0 for entry in result["logs"]]
            assert skipped == [step == FAULT_STEP for step in range(MAX_STEPS)], f"rank {rank} skipped {skipped}"
            assert all(math.isfinite(loss) for loss in result["losses"])
        weights = [run.load(cell, rank) for rank in range(2)]
        assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
        assert all(bool(torch.isfinite(tensor).all()) for tensor in weights[0].values())
    else:
        errors = [result.get("error", "") for result in results]
        for rank, error in enumerate(errors):
            assert error.startswith("NonFiniteLossError"), f"rank {rank} ended with: {error[:800]}"
            for detail in (f"global step {FAULT_STEP}", "micro-batch 0", f"rank {FAULT_RANK}"):
                assert detail in error, f"rank {rank}'s error does not name {detail!r}: {error}"
        assert errors[0] == errors[1]
