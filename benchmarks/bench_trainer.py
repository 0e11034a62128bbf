"""Training-step time and peak memory: `OPDTrainer` configurations side by side with `trl.DistillationTrainer`.

Same student/teacher pair (random tiny Qwen2 models over the toy tokenizer, or bigger with --hidden/--layers), same
prompts, same generation length and batch, same seed; each run is a fresh child process of this one script run.
Reported per run: median `step_time` (TRL's own per-optimizer-step timer, generation included) over the steps after
the first, its ratio to DistillationTrainer's, and peak memory above the loaded models (CUDA allocator peak, or RSS
on CPU). The `diagnostics off` row isolates the cost of trl-opd's per-logging-step diagnostics (logged every step
here, the worst case).

    python benchmarks/bench_trainer.py --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
from pathlib import Path

from common import run_in_child, write_results

RUNS = {
    "trl.DistillationTrainer (reverse, full)": ("trl", {}),
    "OPDTrainer reverse/full, diagnostics off": ("opd", {"diagnostics_max_positions": 0}),
    "OPDTrainer reverse/full (default)": ("opd", {}),
    "OPDTrainer mixed KL w=0.7/full": ("opd", {"kl_direction": "mixed", "forward_kl_weight": 0.7}),
    "OPDTrainer reverse/teacher_topk k=32": ("opd", {"loss_support": "teacher_topk", "loss_top_k": 32}),
    "OPDTrainer reverse/sampled_token": ("opd", {"loss_support": "sampled_token"}),
    "OPDTrainer teacher prefixes/forward": ("opd", {"prefix_source": "teacher", "kl_direction": "forward"}),
}


def _run(kind: str, overrides: dict, settings: dict, queue) -> None:
    import torch
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from trl_opd import OPDConfig, OPDTrainer
    from trl_opd.toy import build_model, build_tokenizer

    torch.set_num_threads(settings["threads"])
    tokenizer = build_tokenizer()
    student = build_model(tokenizer, hidden_size=settings["hidden"], num_layers=settings["layers"], seed=0)
    teacher = build_model(tokenizer, hidden_size=2 * settings["hidden"], num_layers=settings["layers"], seed=1)
    prompts = [[{"role": "user", "content": f"What is {i % 10}+{(7 * i) % 10}?"}] for i in range(512)]
    dataset = Dataset.from_dict({"prompt": prompts})
    common = dict(
        output_dir=tempfile.mkdtemp(),
        max_steps=settings["steps"],
        per_device_train_batch_size=settings["batch"],
        max_completion_length=settings["length"],
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        bf16=torch.cuda.is_available(),
        seed=0,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "trl":
        trainer_cls, args = DistillationTrainer, DistillationConfig(**common)
    else:
        trainer_cls, args = OPDTrainer, OPDConfig(**common, **overrides)
    trainer = trainer_cls(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/statm") as statm:
            baseline = int(statm.read().split()[1]) * resource.getpagesize()
    trainer.train()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    times = [entry["step_time"] for entry in trainer.state.log_history if "step_time" in entry][1:]
    queue.put({"step_time": statistics.median(times), "peak_bytes": max(peak, 0), "device": device})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64, help="max_completion_length")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_trainer.json"))
    parser.add_argument("--markdown", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args()
    settings = {k: getattr(args, k) for k in ("hidden", "layers", "batch", "length", "steps", "threads")}
    results = {}
    for name, (kind, overrides) in RUNS.items():
        results[name] = run_in_child(_run, kind=kind, overrides=overrides, settings=settings)
        print(name, json.dumps(results[name]), flush=True)
    reference = results["trl.DistillationTrainer (reverse, full)"]
    device = reference["device"]
    lines = [
        f"### Training step, toy pair (H={args.hidden}/{2 * args.hidden}, {args.layers} layers, batch {args.batch}, "
        f"{args.length} new tokens) — {device}",
        "",
        "| run | step time (s) | time ratio vs DistillationTrainer | peak extra memory (MiB) |",
        "|---|---|---|---|",
    ]
    for name, row in results.items():
        ratio = row["step_time"] / reference["step_time"]
        lines.append(f"| {name} | {row['step_time']:.3f} | {ratio:.2f} | {row['peak_bytes'] / 2**20:.0f} |")
    write_results({"settings": settings, "results": results}, args.out, "\n".join(lines) + "\n", args.markdown)


if __name__ == "__main__":
    main()
