"""The toy run per objective, plotted: held-out accuracy, completion length, KL, student entropy and top-k overlap
mass over training steps, for forward / reverse / mixed KL on student prefixes and forward / reverse KL on teacher
prefixes (the two axes of docs/concepts.md).

Every run starts from the cached toy pair and uses the main job's `toy` preset (examples/opd_math.py) except for its
objective. Every `--eval_every` steps the student is evaluated on held-out problems with
`trl_opd.evaluation.evaluate` (Avg@k, length) and `heldout_divergence` (KL, entropy, overlap on the student's own
samples, so runs with different prefix sources compare). Each run is a fresh child process.

    python benchmarks/plot_toy_runs.py                # ~5 minutes per run on 2 CPU cores, then plots
    python benchmarks/plot_toy_runs.py --plot_only    # re-plot benchmarks/results/toy_runs.json

Needs matplotlib (`pip install trl-opd[plots]`). Writes benchmarks/results/toy_runs.json and docs/img/toy_runs.png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from common import example_preset, run_in_child

ROOT = Path(__file__).resolve().parent.parent
RUNS: dict[str, dict[str, Any]] = {
    "student prefixes, reverse KL (classic OPD)": {"prefix_source": "student", "kl_direction": "reverse"},
    "student prefixes, forward KL (DAgger-style)": {"prefix_source": "student", "kl_direction": "forward"},
    "student prefixes, mixed 0.8 fwd / 0.2 rev (default)": {
        "prefix_source": "student",
        "kl_direction": "mixed",
        "forward_kl_weight": 0.8,
    },
    "teacher prefixes, forward KL (soft-target SFT)": {"prefix_source": "teacher", "kl_direction": "forward"},
    "teacher prefixes, reverse KL": {"prefix_source": "teacher", "kl_direction": "reverse"},
}
PANELS = (
    ("avg_at_k", "held-out Avg@k"),
    ("mean_length", "completion length (tokens)"),
    ("reverse_kl", "KL(student ‖ teacher) per token"),
    ("forward_kl", "KL(teacher ‖ student) per token"),
    ("student_entropy", "student entropy (nats)"),
    ("overlap_mass_student", "student mass on shared top-k"),
)


def _run(objective: dict[str, Any], settings: dict[str, Any], queue) -> None:
    import torch
    from transformers import TrainerCallback

    from trl_opd import OPDConfig, OPDTrainer
    from trl_opd.evaluation import evaluate, heldout_divergence
    from trl_opd.toy import build_toy_pair, make_dataset

    torch.set_num_threads(2)
    teacher, student, tokenizer = build_toy_pair(progress=False)
    held_out = make_dataset(settings["n_eval"], split="eval")
    preset = example_preset("toy")
    preset.update(output_dir=tempfile.mkdtemp(), report_to=[], disable_tqdm=True, max_steps=settings["steps"])
    args = OPDConfig(**{**preset, **objective})
    history: list[dict[str, float]] = []

    class HeldOut(TrainerCallback):
        def record(self, step: int, model) -> None:
            common = {"max_new_tokens": args.max_completion_length, "temperature": 1.0, "seed": 0, "progress": False}
            accuracy = evaluate(model, tokenizer, held_out, k=settings["k"], batch_size=len(held_out), **common)
            divergence = heldout_divergence(model, teacher, tokenizer, held_out, batch_size=100, **common)
            history.append({"step": step, **accuracy, **divergence})

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.record(0, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % settings["eval_every"] == 0:
                self.record(state.global_step, model)

    trainer = OPDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=make_dataset(
            settings["steps"] * args.per_device_train_batch_size, seed=args.seed, split="train"
        ),
        processing_class=tokenizer,
        callbacks=[HeldOut()],
    )
    teacher_scores = evaluate(
        teacher,
        tokenizer,
        held_out,
        k=settings["k"],
        batch_size=len(held_out),
        seed=0,
        max_new_tokens=args.max_completion_length,
        progress=False,
    )
    trainer.train()
    queue.put({"history": history, "teacher_avg_at_k": teacher_scores["avg_at_k"]})


def plot(report: dict[str, Any], path: Path) -> None:
    """One panel per metric of `PANELS`, one line per run; the teacher's Avg@k as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(15, 8.5), sharex=True)
    for (key, title), axis in zip(PANELS, axes.flat):
        for name, run in report["runs"].items():
            steps = [row["step"] for row in run["history"]]
            axis.plot(steps, [row[key] for row in run["history"]], marker="o", markersize=3, label=name)
        axis.set_title(title)
        axis.grid(alpha=0.3)
    first = next(iter(report["runs"].values()))
    axes.flat[0].axhline(first["teacher_avg_at_k"], color="black", linestyle="--", linewidth=1, label="teacher")
    for axis in axes[1]:
        axis.set_xlabel("training step")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    settings = report["settings"]
    figure.suptitle(
        f"Toy pair, {settings['steps']} steps of the `toy` preset per objective; held-out metrics on "
        f"{settings['n_eval']} problems, student samples (k = {settings['k']} for Avg@k)"
    )
    figure.tight_layout(rect=(0, 0.08, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (the preset's 300)")
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--n_eval", type=int, default=200, help="held-out problems")
    parser.add_argument("--k", type=int, default=2, help="samples per problem for Avg@k")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "toy_runs.json")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "toy_runs.png")
    parser.add_argument("--plot_only", action="store_true", help="re-plot `--out` without training")
    args = parser.parse_args()
    if args.plot_only:
        report = json.loads(args.out.read_text())
    else:
        settings = {key: getattr(args, key) for key in ("steps", "eval_every", "n_eval", "k")}
        report = {"settings": settings, "runs": {}}
        for name in args.runs:
            report["runs"][name] = run_in_child(_run, objective=RUNS[name], settings=settings)
            last = report["runs"][name]["history"][-1]
            print(f"{name}: " + ", ".join(f"{key} {last[key]:.3f}" for key, _ in PANELS), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
    plot(report, args.png)


if __name__ == "__main__":
    main()
