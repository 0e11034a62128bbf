"""What trl-opd's diagnostics cost: the share of training time spent computing them, on the main job's toy run.

The runs use the toy pair and the `toy` preset of examples/opd_math.py (batch 32, 48 new tokens), changing only
`logging_steps` (token diagnostics run on logging steps; TruncRate/RepRate on every generation batch) and, in the
last run, the opt-in gradient-coherence probe. The diagnostics code paths of the trainer
(`_log_completion_rates`, `_token_diagnostics`, `_flush_metrics`) are timed from inside the run and divided by the
run's training time. Measured in the same process as the step they belong to, the ratio does not depend on how
loaded the machine is, unlike the difference of two separately timed runs. A fresh child process per run.

    python benchmarks/bench_diagnostics.py --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import example_preset, run_in_child, write_results

DIAGNOSTICS = ("_log_completion_rates", "_token_diagnostics", "_flush_metrics")
RUNS = {
    "logging_steps=1 (worst case)": {"logging_steps": 1},
    "logging_steps=10 (DistillationConfig default)": {"logging_steps": 10},
    "logging_steps=25 (toy preset)": {"logging_steps": 25},
    "logging_steps=1 + gradient-coherence probe": {"logging_steps": 1, "diagnostics_gradient_coherence": True},
}


def _run(overrides: dict, settings: dict, queue) -> None:
    import torch

    from trl_opd import OPDConfig, OPDTrainer
    from trl_opd.toy import build_toy_pair, make_dataset

    torch.set_num_threads(settings["threads"])
    teacher, student, tokenizer = build_toy_pair(progress=False)
    preset = example_preset("toy")
    preset.update(output_dir=tempfile.mkdtemp(), report_to=[], disable_tqdm=True, max_steps=settings["steps"])
    args = OPDConfig(**{**preset, **overrides})
    dataset = make_dataset(settings["steps"] * args.per_device_train_batch_size, split="train")
    trainer = OPDTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    spent = dict.fromkeys(DIAGNOSTICS, 0.0)

    def timed(name: str):
        method = getattr(trainer, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        return wrapper

    for name in DIAGNOSTICS:
        setattr(trainer, name, timed(name))
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    queue.put({"train_seconds": total, "diagnostics_seconds": spent, "share": sum(spent.values()) / total})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_diagnostics.json"))
    parser.add_argument("--markdown", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args()
    settings = {"steps": args.steps, "threads": args.threads}
    results = {name: run_in_child(_run, overrides=overrides, settings=settings) for name, overrides in RUNS.items()}
    lines = [
        f"### Diagnostics cost, toy run ({args.steps} steps of the `toy` preset, CPU, {args.threads} threads)",
        "",
        "| run | training time (s) | in diagnostics (s) | share of training time |",
        "|---|---|---|---|",
    ]
    for name, row in results.items():
        spent = sum(row["diagnostics_seconds"].values())
        lines.append(f"| {name} | {row['train_seconds']:.1f} | {spent:.2f} | {100 * row['share']:.1f}% |")
    write_results({"settings": settings, "results": results}, args.out, "\n".join(lines) + "\n", args.markdown)


if __name__ == "__main__":
    main()
