"""Training-step time with a served or cached teacher against the same teacher held locally, on the toy pair.

The toy teacher is saved once (weights + tokenizer) and used three ways in one script run: loaded into the training
process (`teacher_model=<model>`), served by `trl-opd serve-teacher` in a separate process
(`teacher_model="http://127.0.0.1:PORT"`), the realistic deployment, and, for dataset prefixes, cached: its top-k
stored once in the dataset by `cache_teacher_topk` (timed, in its own child process, including `save_to_disk`),
then training with `teacher_model=None` from `load_from_disk`. Each training run is a fresh child process with the
main job's `toy` preset (batch 32, 48 new tokens, mixed KL w=0.8), `loss_support="teacher_topk"`, `loss_top_k=16`,
token diagnostics off (served and cached teachers skip them, so a local run would pay for them alone), for student
prefixes and for dataset prefixes. Reported per prefix source: the median step time (a callback timing
`on_step_begin` -> `on_step_end`, generation included, after the warm-up steps), the ratios to the local teacher,
the first losses of every run (same teacher, same seed: they should agree closely), and the one-off cache build.

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
from common import example_preset, run_in_child, write_results

ROOT = Path(__file__).resolve().parent.parent
TEACHERS = {"student": ("local", "served"), "dataset": ("local", "served", "cached")}  # per prefix source
TOP_K = 16
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


def _config(prefix_source: str, settings: dict) -> dict:
    """The `OPDConfig` fields of every run: the `toy` preset, teacher top-k, no diagnostics, the timed steps."""
    preset = example_preset("toy")
    preset.update(
        output_dir=tempfile.mkdtemp(),
        max_steps=settings["warmup"] + settings["steps"],
        logging_steps=1,
        prefix_source=prefix_source,
        loss_support="teacher_topk",
        loss_top_k=TOP_K,
        diagnostics_max_positions=0,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    return preset


def _build_cache(paths: dict[str, str], settings: dict, queue) -> None:
    """The one-off cost of a cached teacher, in a child process: `cache_teacher_topk` of the whole training dataset
    with the local teacher, at the trainer's teacher temperature and length cap, then `save_to_disk`."""
    import torch
    from transformers import Qwen2ForCausalLM

    from trl_opd import OPDConfig
    from trl_opd.teacher_cache import cache_teacher_topk
    from trl_opd.toy import build_tokenizer, make_dataset

    torch.set_num_threads(settings["threads"])
    args = OPDConfig(**_config("dataset", settings))
    teacher, tokenizer = Qwen2ForCausalLM.from_pretrained(paths["teacher"]), build_tokenizer()
    dataset = make_dataset(settings["problems"], seed=0)
    start = time.perf_counter()
    cached = cache_teacher_topk(
        dataset,
        teacher,
        tokenizer,
        top_k=TOP_K,
        temperature=args.resolved_teacher_temperature,
        max_completion_length=args.max_completion_length,
        chat_template_kwargs=args.chat_template_kwargs,
    )
    cached.save_to_disk(paths["cache"])
    queue.put({"seconds": time.perf_counter() - start, "rows": len(cached)})


def _run(teacher: str, prefix_source: str, paths: dict[str, str], settings: dict, queue) -> None:
    """One training run in a child process: `teacher` is "local", "cached" (the saved cache, no teacher model) or
    the server's URL. Puts the timed step times, the first losses and the device on `queue`."""
    import torch
    from datasets import load_from_disk
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
    teacher_model = None if teacher == "cached" else teacher
    if teacher == "local":
        teacher_model = Qwen2ForCausalLM.from_pretrained(paths["teacher"]).eval()
    dataset = load_from_disk(paths["cache"]) if teacher == "cached" else make_dataset(settings["problems"], seed=0)
    timer = StepTimer()
    trainer = OPDTrainer(
        model=student,
        teacher_model=teacher_model,
        args=OPDConfig(**_config(prefix_source, settings)),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][:FIRST_LOSSES]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    queue.put({"step_times": timer.times[settings["warmup"] :], "first_losses": losses, "device": device})


def _summary(runs: dict[str, dict]) -> dict[str, float]:
    """Median step time of each teacher run for one prefix source, and its ratio to the local teacher's (and, for
    the cache, to the served teacher's)."""
    steps = {name: statistics.median(run["step_times"]) for name, run in runs.items()}
    summary = {f"{name}_step_s": seconds for name, seconds in steps.items()}
    summary |= {f"{name}_over_local": steps[name] / steps["local"] for name in steps if name != "local"}
    if "cached" in steps:
        summary["cached_over_served"] = steps["cached"] / steps["served"]
    return summary


def _losses(run: dict) -> str:
    return ", ".join(f"{loss:.4f}" for loss in run["first_losses"])


def _table(results: dict[str, dict[str, dict]], cache: dict, settings: dict) -> str:
    """Two markdown tables: served vs local per prefix source; cached vs live teachers on dataset prefixes, with the
    cache's one-off build time and the number of steps it takes to pay for itself."""
    heading = (
        f"(`toy` preset: batch {settings['batch']}, {settings['length']} new tokens; teacher_topk k={TOP_K}; median "
        f"of {settings['steps']} steps after {settings['warmup']} warm-up) — {settings['machine']}"
    )
    lines = [
        f"### Served vs local teacher, toy pair {heading}",
        "",
        "| prefixes | local step (s) | served step (s) | served / local | first losses, local "
        "| first losses, served |",
        "|---|---|---|---|---|---|",
    ]
    for source, runs in results.items():
        summary = _summary(runs)
        lines.append(
            f"| {source} | {summary['local_step_s']:.3f} | {summary['served_step_s']:.3f} | "
            f"{summary['served_over_local']:.2f}× | {_losses(runs['local'])} | {_losses(runs['served'])} |"
        )
    runs = results["dataset"]
    summary = _summary(runs)
    saving = summary["local_step_s"] - summary["cached_step_s"]
    payback = (
        f"it pays for itself after {cache['seconds'] / saving:.0f} steps"
        if saving > 0
        else "here it never pays for itself: the cached step is not faster"
    )
    lines += [
        "",
        f"### Cached vs live teacher on dataset prefixes, toy pair {heading}",
        "",
        "| teacher | step (s) | / local | / served | first losses |",
        "|---|---|---|---|---|",
    ]
    for name in TEACHERS["dataset"]:
        over_local = "1.00×" if name == "local" else f"{summary[f'{name}_over_local']:.2f}×"
        over_served = f"{summary[f'{name}_step_s'] / summary['served_step_s']:.2f}×"
        lines.append(
            f"| {name} | {summary[f'{name}_step_s']:.3f} | {over_local} | {over_served} | {_losses(runs[name])} |"
        )
    lines += [
        "",
        f"Building the cache (`cache_teacher_topk` with the local teacher, then `save_to_disk`): "
        f"{cache['seconds']:.1f} s for {cache['rows']} rows ({1000 * cache['seconds'] / cache['rows']:.1f} ms a row); "
        f"against the local teacher {payback}.",
    ]
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
    preset = example_preset("toy")
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
    paths = _save_pair(work, args.random_pair) | {"cache": str(work / "teacher_topk_cache")}
    cache = run_in_child(_build_cache, paths=paths, settings=settings)
    print("cache", json.dumps(cache), flush=True)
    server, url = _start_server(paths["teacher"], args.threads, work / "server.log")
    results: dict[str, dict[str, dict]] = {}
    try:
        for source, teachers in TEACHERS.items():
            results[source] = {}
            for name in teachers:
                teacher = url if name == "served" else name
                run = run_in_child(_run, teacher=teacher, prefix_source=source, paths=paths, settings=settings)
                results[source][name] = run
                print(source, name, json.dumps(run), flush=True)
    finally:
        _stop_server(server)
    device = results["student"]["local"]["device"]
    settings["device"], settings["machine"] = device, args.machine or device
    settings["total_seconds"] = round(time.perf_counter() - start, 1)
    summary = {source: _summary(runs) for source, runs in results.items()}
    report = {"settings": settings, "summary": summary, "cache_build": cache, "results": results}
    write_results(report, out, _table(results, cache, settings), None if args.smoke else args.markdown)
    print(f"results: {out} ({settings['total_seconds']} s)")


if __name__ == "__main__":
    main()
