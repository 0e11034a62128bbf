"""Training-step time with a served teacher against the same teacher held locally, on the toy pair.

The toy teacher is saved once (weights + tokenizer) and used two ways in one script run: loaded into the training
process (`teacher_model=<model>`), and served by `trl-opd serve-teacher` in a separate process
(`teacher_model="http://127.0.0.1:PORT"`), the realistic deployment. Each training run is a fresh child process with
the main job's `toy` preset (batch 32, 48 new tokens, mixed KL w=0.8), `loss_support="teacher_topk"`,
`loss_top_k=16`, token diagnostics off (a served teacher skips them, so a local run would pay for them alone), for
student prefixes and for dataset prefixes. Reported per prefix source: the median step time (a callback timing
`on_step_begin` -> `on_step_end`, generation included, after the warm-up steps), the ratio served / local, and the
first losses of both runs (same teacher, same seed: they should agree closely).

    python benchmarks/bench_teachers.py                 # the table in docs/benchmarks.md
    python benchmarks/bench_teachers.py --smoke         # 1 warm-up + 1 timed step per run, results to a temp file
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from common import run_in_child, toy_preset, write_results

ROOT = Path(__file__).resolve().parent.parent
PREFIX_SOURCES = ("student", "dataset")
TEACHERS = ("local", "served")
FIRST_LOSSES = 3  # loss values reported per run for the sanity column


def _free_port() -> int:
    """A TCP port on the loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _save_pair(directory: Path, random_pair: bool) -> dict[str, str]:
    """Save the toy teacher (with the tokenizer, for the server) and student under `directory`; return their paths.

    The cached trained pair (`trl_opd.toy.build_toy_pair`, built on first use) unless `random_pair`, in which case
    freshly initialised models of the same shapes.
    """
    from trl_opd.toy import ToyPairConfig, build_model, build_tokenizer, build_toy_pair

    if random_pair:
        config, tokenizer = ToyPairConfig(), build_tokenizer()
        teacher = build_model(
            tokenizer, hidden_size=config.teacher_hidden_size, num_layers=config.teacher_num_layers, seed=1
        )
        student = build_model(
            tokenizer, hidden_size=config.student_hidden_size, num_layers=config.student_num_layers, seed=0
        )
    else:
        teacher, student, tokenizer = build_toy_pair(progress=False)
    paths = {"teacher": str(directory / "teacher"), "student": str(directory / "student")}
    for role, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(paths[role])
        tokenizer.save_pretrained(paths[role])
    return paths


def _start_server(teacher_dir: str, threads: int, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Launch `python -m trl_opd.cli serve-teacher` on a free port; return the process and its URL once `/health`
    answers (within 120 s, else the process is killed and this raises)."""
    port = _free_port()
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": pythonpath}
    command = [sys.executable, "-m", "trl_opd.cli", "serve-teacher", teacher_dir, "--port", str(port)]
    log = log_path.open("w")
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    _stop_server(process)
    raise RuntimeError(f"serve-teacher did not answer /health within 120 s:\n{log_path.read_text()[-2000:]}")


def _stop_server(process: subprocess.Popen) -> None:
    """SIGTERM the server (it shuts down cleanly on it), then SIGKILL it if it is still up after 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _run(teacher: str, prefix_source: str, paths: dict[str, str], settings: dict, queue) -> None:
    """One training run in a child process: `teacher` is "local" or the server's URL. Puts the timed step times, the
    first losses and the device on `queue`."""
    import torch
    from transformers import Qwen2ForCausalLM, TrainerCallback

    from trl_opd import OPDConfig, OPDTrainer
    from trl_opd.toy import build_tokenizer, make_dataset

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step, `on_step_begin` -> `on_step_end` (generation and teacher included)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs) -> None:
            self.times.append(time.perf_counter() - self.start)

    torch.set_num_threads(settings["threads"])
    tokenizer = build_tokenizer()
    student = Qwen2ForCausalLM.from_pretrained(paths["student"])
    teacher_model = Qwen2ForCausalLM.from_pretrained(paths["teacher"]).eval() if teacher == "local" else teacher
    preset = toy_preset()
    preset.update(
        output_dir=tempfile.mkdtemp(),
        max_steps=settings["warmup"] + settings["steps"],
        logging_steps=1,
        prefix_source=prefix_source,
        loss_support="teacher_topk",
        loss_top_k=16,
        diagnostics_max_positions=0,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    timer = StepTimer()
    trainer = OPDTrainer(
        model=student,
        teacher_model=teacher_model,
        args=OPDConfig(**preset),
        train_dataset=make_dataset(settings["problems"], seed=0),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][:FIRST_LOSSES]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    queue.put({"step_times": timer.times[settings["warmup"] :], "first_losses": losses, "device": device})


def _summary(runs: dict[str, dict]) -> dict[str, float]:
    """Median step time of each teacher and the served / local ratio, for one prefix source."""
    local, served = (statistics.median(runs[name]["step_times"]) for name in TEACHERS)
    return {"local_step_s": local, "served_step_s": served, "served_over_local": served / local}


def _table(results: dict[str, dict[str, dict]], settings: dict) -> str:
    """The markdown table: per prefix source, median step times, the served / local ratio and the first losses."""
    lines = [
        f"### Served vs local teacher, toy pair (`toy` preset: batch {settings['batch']}, "
        f"{settings['length']} new tokens; teacher_topk k=16; median of {settings['steps']} steps after "
        f"{settings['warmup']} warm-up) — {settings['machine']}",
        "",
        "| prefixes | local step (s) | served step (s) | served / local | first losses, local "
        "| first losses, served |",
        "|---|---|---|---|---|---|",
    ]
    for source, runs in results.items():
        summary = _summary(runs)
        losses = {name: ", ".join(f"{loss:.4f}" for loss in runs[name]["first_losses"]) for name in TEACHERS}
        lines.append(
            f"| {source} | {summary['local_step_s']:.3f} | {summary['served_step_s']:.3f} | "
            f"{summary['served_over_local']:.2f}× | {losses['local']} | "
            f"{losses['served']} |"
        )
    if settings["device"] == "cpu":
        lines += [
            "",
            "The served teacher is `trl-opd serve-teacher` in its own process on the same CPU: it competes with the "
            "training process for the same cores.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--smoke", action="store_true", help="1 warm-up and 1 timed step; results to a temp file")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the trainer and of the server")
    parser.add_argument("--problems", type=int, default=512, help="training problems in the dataset")
    parser.add_argument("--random-pair", action="store_true", help="random models of the toy shapes, not the cache")
    parser.add_argument("--machine", default=None, help="how the table names the machine (default: the device)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/bench_teachers.json")
    parser.add_argument("--markdown", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup = 1, 1
    work = Path(tempfile.mkdtemp(prefix="bench_teachers-"))
    out = args.out or (work / "bench_teachers.json" if args.smoke else ROOT / "benchmarks/results/bench_teachers.json")
    preset = toy_preset()
    settings = {
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
        "problems": args.problems,
        "batch": preset["per_device_train_batch_size"],
        "length": preset["max_completion_length"],
        "random_pair": args.random_pair,
    }
    start = time.perf_counter()
    paths = _save_pair(work, args.random_pair)
    server, url = _start_server(paths["teacher"], args.threads, work / "server.log")
    results: dict[str, dict[str, dict]] = {}
    try:
        for source in PREFIX_SOURCES:
            results[source] = {}
            for name in TEACHERS:
                teacher = "local" if name == "local" else url
                run = run_in_child(_run, teacher=teacher, prefix_source=source, paths=paths, settings=settings)
                results[source][name] = run
                print(source, name, json.dumps(run), flush=True)
    finally:
        _stop_server(server)
    device = results[PREFIX_SOURCES[0]]["local"]["device"]
    settings["device"], settings["machine"] = device, args.machine or device
    settings["total_seconds"] = round(time.perf_counter() - start, 1)
    summary = {source: _summary(runs) for source, runs in results.items()}
    report = {"settings": settings, "summary": summary, "results": results}
    write_results(report, out, _table(results, settings), None if args.smoke else args.markdown)
    print(f"results: {out} ({settings['total_seconds']} s)")


if __name__ == "__main__":
    main()
