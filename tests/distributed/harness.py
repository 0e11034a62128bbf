"""Driving `run_matrix.py`: launch a backend (or the single-process reference) on some cells, and check a cell's
result against the reference. Shared by `tests/test_distributed_matrix.py` and `scripts/distributed_matrix.py`.

A launch with served cells (`Cell.served`) first serves the pair's teacher with `trl_opd.teacher_server.serve` on a
free loopback port, in a thread of this process: one server for all ranks (and for the reference), as one
`trl-opd serve-teacher` would be in a deployment, stopped when the launch ends."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from cells import MAX_STEPS, lookup  # tests/distributed is on sys.path, as run_matrix.py imports it
from run_matrix import build_pair

from trl_opd.teacher_server import TeacherServer, serve
from trl_opd.toy import build_tokenizer

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tests/distributed/run_matrix.py"
CONFIGS = {
    "ddp": ROOT / "configs/accelerate/cpu_2proc.yaml",
    "zero2": ROOT / "tests/distributed/zero2_cpu.yaml",
    "zero3": ROOT / "tests/distributed/zero3_init_cpu.yaml",
    "fsdp2": ROOT / "tests/distributed/fsdp2_cpu.yaml",
}
EXPECTED_BACKEND = {  # what `run_matrix.backend_of` must report, so a misconfigured launch cannot pass as another
    "ddp": {"zero_stage": None, "fsdp_version": None, "wrapper": "DistributedDataParallel"},
    "zero2": {"zero_stage": 2, "wrapper": "DeepSpeedEngine"},
    "zero3": {"zero_stage": 3, "zero3_init": True, "wrapper": "DeepSpeedEngine"},
    "fsdp2": {"zero_stage": None, "fsdp_version": 2, "dtensor": True},
}
# Of the reference's update ‖w_ref − w_0‖: float noise between process counts is < 1e-6 of it on CPU; a gradient off
# by 2× is 1, a rank-local loss normalisation 0.03-0.07 on cells whose ranks hold different token counts.
RTOL = 1e-4
ATOL = 1e-7  # per element, for parameters the update barely moves


@dataclass
class Launch:
    """One `run_matrix.py` run: its ranks' reports (None where a rank wrote nothing), exit code and output tail."""

    backend: str | None
    out: Path
    ranks: list[dict[str, Any] | None]
    returncode: int | None  # None: killed at the timeout
    seconds: float
    output: str = ""
    world_size: int = 2
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def cell(self, rank: int, name: str) -> dict[str, Any] | None:
        report = self.ranks[rank]
        return None if report is None else report["cells"].get(name)

    def load(self, name: str, rank: int = 0) -> dict[str, torch.Tensor]:
        """The final weights of cell `name` on `rank` (`name="initial"`: the student before training)."""
        key = "initial" if name == "initial" else f"{name}.rank{rank}"
        if key not in self.weights:
            self.weights[key] = torch.load(self.out / "weights" / f"{key}.pt")
        return self.weights[key]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    backend: str | None, cells: list[str], out: Path, timeout: float, collective_timeout: float = 90.0
) -> Launch:
    """Run `cells` under `backend` (two processes) or, for `backend=None`, in one plain Python process."""
    out.mkdir(parents=True, exist_ok=True)
    arguments = [str(RUNNER), "--out", str(out), "--collective_timeout", str(collective_timeout), "--cells", *cells]
    server = serve_teacher() if any(lookup(name).served for name in cells) else None
    try:
        return _launch(backend, arguments + (["--teacher_url", server.url] if server else []), out, timeout)
    finally:
        if server is not None:
            server.shutdown()


def serve_teacher() -> TeacherServer:
    """`run_matrix.build_pair`'s teacher, served on a free loopback port."""
    tokenizer = build_tokenizer()
    return serve(build_pair(tokenizer)["teacher"], tokenizer, port=0, served_model_name="matrix-teacher")


def _launch(backend: str | None, arguments: list[str], out: Path, timeout: float) -> Launch:
    """Run `run_matrix.py` with `arguments` in one process or two, killed after `timeout` seconds."""
    if backend is None:
        command, world_size = [sys.executable, *arguments], 1
    else:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        config = ["--config_file", str(CONFIGS[backend]), "--main_process_port", str(free_port())]
        command, world_size = [accelerate, "launch", *config, *arguments], 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    started = time.perf_counter()
    with (out / "output.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        try:
            returncode: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(process)
            returncode = None
    seconds = time.perf_counter() - started
    ranks = []
    for rank in range(world_size):
        path = out / f"rank{rank}.json"
        ranks.append(json.loads(path.read_text()) if path.exists() else None)
    output = (out / "output.log").read_text(errors="replace")[-6000:]
    return Launch(backend, out, ranks, returncode, seconds, output, world_size)


def kill(process: subprocess.Popen) -> None:
    """Stop the launcher and its workers (torchrun's children share its process group only under `setsid`, so the
    workers are found through /proc)."""
    children = [int(pid) for pid in _descendants(process.pid)]
    for pid in [process.pid, *children]:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    process.wait()


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            found += [int(child) for child in children]
            frontier += [int(child) for child in children]
    return found


def describe(launch: Launch) -> str:
    """Why a launch left cells unreported: timeout or exit code, and the tail of its output."""
    state = f"timed out after {launch.seconds:.0f} s" if launch.returncode is None else f"exit {launch.returncode}"
    return f"{launch.backend or 'single process'} launch: {state}; output tail:\n{launch.output[-2500:]}"


def _error(result: dict[str, Any]) -> str:
    return f"{result.get('error')}\n{result.get('traceback', '')[-1500:]}"


def check_cell(run: Launch, reference: Launch, name: str) -> list[str]:
    """Everything wrong with cell `name` of `run` against `reference` (the same cell in one process); [] if none."""
    problems = []
    ref = reference.cell(0, name)
    if ref is None or ref.get("status") != "ok":
        return [f"reference run of {name} failed: {_error(ref) if ref else describe(reference)}"]
    results = [run.cell(rank, name) for rank in range(run.world_size)]
    for rank, result in enumerate(results):
        if result is None:
            problems.append(f"rank {rank} did not report {name} (crashed or hung): {describe(run)}")
        elif result.get("status") != "ok":
            problems.append(f"rank {rank} failed: {_error(result)}")
    if problems:
        return problems
    expected = EXPECTED_BACKEND.get(run.backend or "", {})
    for rank, result in enumerate(results):
        actual = {key: result["backend"].get(key) for key in expected}
        if actual != expected:
            problems.append(f"rank {rank} ran {result['backend']}, expected {expected}")
        losses = result["losses"]
        if len(losses) != MAX_STEPS or not all(math.isfinite(loss) for loss in losses):
            problems.append(f"rank {rank} logged losses {losses}, expected {MAX_STEPS} finite ones")
    if run.backend == "zero3" and not run.ranks[0].get("from_paths"):
        problems.append("ZeRO-3 must load the models from paths (zero3_init_flag)")
    problems += _check_batches(results, ref)
    weights = [run.load(name, rank) for rank in range(run.world_size)]
    for rank in range(1, run.world_size):
        differing = [key for key in weights[0] if not torch.equal(weights[0][key], weights[rank][key])]
        if differing:
            problems.append(f"rank {rank}'s final weights differ from rank 0's in {differing}")
    problems += compare_weights(weights[0], reference.load(name), reference.load("initial"))
    return problems


def _check_batches(results: list[dict[str, Any]], ref: dict[str, Any]) -> list[str]:
    """The ranks together saw the reference's rows in every generation batch, drew its prefix sources, and
    (before any update could make them diverge) generated its completions."""
    problems = []
    if any(len(result["rows"]) != len(ref["rows"]) for result in results):
        return [f"generation batches per rank {[len(r['rows']) for r in results]}, reference {len(ref['rows'])}"]
    for step, expected in enumerate(ref["rows"]):
        seen = Counter(row for result in results for row in result["rows"][step])
        if seen != Counter(expected):
            problems.append(f"generation batch {step}: the ranks saw {dict(seen)}, the reference {expected}")
    for result in results:
        if result["student_prefix"] != ref["student_prefix"]:
            problems.append(f"prefix draws {result['student_prefix']} != reference {ref['student_prefix']}")
    first = Counter(tuple(row) for result in results for row in result["completions"][0])
    if first != Counter(tuple(row) for row in ref["completions"][0]):
        problems.append("the first generation batch's completions differ from the reference's (non-deterministic?)")
    return problems


def compare_weights(
    run: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> list[str]:
    """Per parameter, ‖w_run − w_ref‖ ≤ RTOL·‖w_ref − w_0‖ + ATOL·√n, and the same over the whole model."""
    problems, total_error, total_update = [], 0.0, 0.0
    for key, reference in ref.items():
        error = float((run[key].double() - reference.double()).norm())
        update = float((reference.double() - initial[key].double()).norm())
        total_error, total_update = total_error + error**2, total_update + update**2
        if error > RTOL * update + ATOL * math.sqrt(reference.numel()):
            problems.append(f"{key}: ‖w − w_ref‖ = {error:.3g} against an update ‖w_ref − w_0‖ = {update:.3g}")
    if math.sqrt(total_error) > RTOL * math.sqrt(total_update):
        ratio = math.sqrt(total_error / max(total_update, 1e-30))
        problems.insert(0, f"final weights differ from the single-process run by {ratio:.3g} of its update")
    return problems
