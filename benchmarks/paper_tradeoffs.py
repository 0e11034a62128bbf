"""The three tradeoffs of Decoupling KL and Trajectories (arXiv 2605.16826) on the horizon world (`--preset horizon`).

Objectives, each from the cached horizon pair with the example's `horizon` preset except for what it names:
the 2×2 of prefix source (teacher samples / the student's own) × token-level KL (forward / reverse, the preset's
default being reverse KL on student prefixes), mixed KL on student prefixes, forward KL on dataset (gold) prefixes,
and the default with `EntropyGatedLengthCurriculum`. Every objective runs `--steps` steps for each of `--seeds`
(equal steps); then every objective whose training time differs from the default's by more than 10% runs again with
its steps scaled so that its training time matches the default's (equal wall time; off with `--no_equal_time`).
Held-out metrics on `--n_eval` problems, sampled from the student at the training temperature: Avg@k and Pass@k, mean
completion length and truncation rate (`trl_opd.evaluation.evaluate`), the student's entropy on its own samples
(`heldout_divergence`). Training wall time excludes evaluation. Each run is a fresh child process.

    python benchmarks/paper_tradeoffs.py                         # 14 runs + reruns
    python benchmarks/paper_tradeoffs.py --seeds 0 1 2 --steps 300 --n_eval 200
    python benchmarks/paper_tradeoffs.py --plot_only             # re-plot benchmarks/results/paper_tradeoffs.json
    python benchmarks/paper_tradeoffs.py --resume --seeds 0      # add what is missing (here: equal time, seed 0)

Needs matplotlib (`pip install trl-opd[plots]`). Writes benchmarks/results/paper_tradeoffs.json and
docs/img/paper_tradeoffs.png, and prints a markdown table (`--markdown FILE` appends it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import example_preset, run_in_child, write_results

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = "student prefixes, reverse KL (default)"
CURRICULUM = "default + entropy-gated length curriculum"
OBJECTIVES: dict[str, dict[str, Any]] = {
    DEFAULT: {},
    "student prefixes, forward KL": {"prefix_source": "student", "kl_direction": "forward"},
    "student prefixes, mixed KL (w=0.5)": {
        "prefix_source": "student",
        "kl_direction": "mixed",
        "forward_kl_weight": 0.5,
    },
    "teacher prefixes, forward KL": {"prefix_source": "teacher", "kl_direction": "forward"},
    "teacher prefixes, reverse KL": {"prefix_source": "teacher", "kl_direction": "reverse"},
    "dataset prefixes, forward KL": {"prefix_source": "dataset", "kl_direction": "forward"},
    CURRICULUM: {"curriculum": True},
}
METRICS = ("avg_at_k", "pass_at_k", "student_entropy", "mean_length", "truncation_rate")


def _run(objective: dict[str, Any], seed: int, steps: int, settings: dict[str, Any], queue) -> None:
    import torch
    from transformers import TrainerCallback

    from trl_opd import EntropyGatedLengthCurriculum, OPDConfig, OPDTrainer
    from trl_opd.evaluation import evaluate, heldout_divergence
    from trl_opd.horizon import HorizonPairConfig, make_dataset, problem_pool
    from trl_opd.toy import build_toy_pair

    torch.set_num_threads(1)  # on 2 cores a second thread slows this generation-bound step (0.84 s against 0.65 s)
    teacher, student, tokenizer = build_toy_pair(config=HorizonPairConfig(), progress=False)
    held_out = make_dataset(settings["n_eval"], split="eval")
    objective = dict(objective)
    curriculum = objective.pop("curriculum", False)
    preset = example_preset("horizon")
    budget = preset["max_completion_length"]
    preset.update(output_dir=tempfile.mkdtemp(), report_to=[], disable_tqdm=True, max_steps=steps, seed=seed)
    preset.update({key: settings[key] for key in ("per_device_train_batch_size", "temperature") if settings[key]})
    args = OPDConfig(**{**preset, **objective})
    callbacks, history = [], []
    if curriculum:
        ladder = [int(f * budget) for f in settings["ladder"]]
        callbacks.append(
            EntropyGatedLengthCurriculum(
                ladder,
                min_entropy=settings["min_entropy"],
                check_every_steps=max(1, steps // (2 * len(ladder))),
                min_steps_per_stage=max(1, steps // (2 * len(ladder))),
                eval_prompts=make_dataset(16, seed=1, split="eval"),
            )
        )

    class HeldOut(TrainerCallback):
        """Held-out metrics every `eval_every` steps and at the end; the time they take is not training time."""

        def __init__(self) -> None:
            self.start, self.excluded = 0.0, 0.0

        def record(self, step: int, model) -> None:
            begin = time.perf_counter()
            common = {"max_new_tokens": budget, "temperature": args.temperature, "seed": 0, "progress": False}
            accuracy = evaluate(model, tokenizer, held_out, k=settings["k"], batch_size=200, **common)
            divergence = heldout_divergence(model, teacher, tokenizer, held_out, batch_size=100, **common)
            train_seconds = begin - self.start - self.excluded
            history.append({"step": step, "train_seconds": train_seconds, **accuracy, **divergence})
            self.excluded += time.perf_counter() - begin

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            every = settings["eval_every"]
            if state.global_step == state.max_steps or (every and state.global_step % every == 0):
                self.record(state.global_step, model)

    trainer = OPDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=make_dataset(len(problem_pool("train")), seed=seed, split="train"),  # epochs as steps need
        processing_class=tokenizer,
        callbacks=[*callbacks, HeldOut()],
    )
    trainer.train()
    queue.put({"history": history})


def _final(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per metric (and training seconds), the last evaluation of each seed's run."""
    keys = (*METRICS, "train_seconds", "step")
    return {key: [run["history"][-1][key] for run in runs] for key in keys}


def _cell(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(report: dict[str, Any], phase: str) -> str:
    """A markdown table of the last evaluation of every objective in `phase` ("equal_steps" or "equal_time")."""
    k = report["settings"]["k"]
    lines = [
        f"| objective | steps | Avg@{k} | Pass@{k} | student entropy | length | truncation | train wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in report[phase].items():
        final = _final(runs)
        steps = "/".join(str(s) for s in sorted(set(final["step"])))
        cells = [_cell(final[key]) for key in ("avg_at_k", "pass_at_k", "student_entropy")]
        cells += [_cell(final["mean_length"], 1), _cell(final["truncation_rate"]), _cell(final["train_seconds"], 0)]
        lines.append(f"| {name} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Avg@k over training time and steps, the final Avg@k / Pass@k at equal steps and equal wall time, entropy
    against Avg@k, and the final length with its truncation rate; means over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    names = list(report["equal_steps"])
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    k = report["settings"]["k"]
    for name, runs in report["equal_steps"].items():
        evaluations = min(len(run["history"]) for run in runs)
        mean = {
            key: [statistics.fmean(run["history"][i][key] for run in runs) for i in range(evaluations)]
            for key in ("step", "train_seconds", "avg_at_k")
        }
        before = report["before"]["avg_at_k"]
        axes[0, 0].plot([0, *mean["train_seconds"]], [before, *mean["avg_at_k"]], "o-", color=colors[name], label=name)
        axes[1, 0].plot([0, *mean["step"]], [before, *mean["avg_at_k"]], "o-", color=colors[name], label=name)
    for axis, xlabel in ((axes[0, 0], "training wall time (s, evaluation excluded)"), (axes[1, 0], "step")):
        axis.axhline(report["teacher"]["avg_at_k"], color="black", linestyle="--", linewidth=1, label="teacher")
        axis.set(xlabel=xlabel, ylabel=f"held-out Avg@{k}")
        axis.grid(alpha=0.3)
    positions = range(len(names))
    for axis, phase, title in (
        (axes[0, 1], "equal_steps", "equal steps"),
        (axes[0, 2], "equal_time", "equal training wall time"),
    ):
        finals = [_final(report[phase][name]) if name in report[phase] else None for name in names]
        for offset, key in ((-0.2, "avg_at_k"), (0.2, "pass_at_k")):
            heights = [statistics.fmean(f[key]) if f else 0 for f in finals]
            axis.bar([p + offset for p in positions], heights, width=0.4, label=f"{key[:-5]}@{k}",
                     color=[colors[n] for n in names], alpha=1.0 if key == "avg_at_k" else 0.45)  # fmt: skip
        axis.set_xticks(list(positions), [f"{i}" for i in positions])
        axis.set_title(f"Avg@{k} (solid) and Pass@{k} (light) at {title}")
        axis.set_xlabel("objective (numbered as in the legend)")
        axis.grid(alpha=0.3, axis="y")
    for name in names:
        final = _final(report["equal_steps"][name])
        axes[1, 1].scatter(final["student_entropy"], final["avg_at_k"], color=colors[name], s=40)
        axes[1, 2].scatter(final["mean_length"], final["avg_at_k"], color=colors[name], s=40)
    axes[1, 1].set(xlabel="student entropy on its own samples (nats/token)", ylabel=f"Avg@{k}",
                   title="KL direction: accuracy vs entropy (equal steps, one dot per seed)")  # fmt: skip
    axes[1, 2].set(xlabel="mean completion length (tokens)", ylabel=f"Avg@{k}",
                   title="horizon: accuracy vs length (equal steps, one dot per seed)")  # fmt: skip
    for axis in axes[1, 1:]:
        axis.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[n], marker="o", label=f"{i}: {n}") for i, n in enumerate(names)]
    handles.append(plt.Line2D([], [], color="black", linestyle="--", label="teacher"))
    figure.legend(handles=handles, loc="lower center", ncol=3, frameon=False)
    settings = report["settings"]
    figure.suptitle(
        f"Horizon world: {settings['steps']} steps per objective, seeds {settings['seeds']}, {settings['n_eval']} "
        f"held-out problems, k = {k}; 2 shared CPU cores (wall times are noisy)"
    )
    figure.tight_layout(rect=(0, 0.09, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


def _reference(settings: dict[str, Any], queue) -> None:
    """Teacher and untrained-student metrics on the held-out set (once per benchmark)."""
    import torch

    from trl_opd.evaluation import evaluate, heldout_divergence
    from trl_opd.horizon import HorizonPairConfig, make_dataset
    from trl_opd.toy import build_toy_pair

    torch.set_num_threads(1)
    teacher, student, tokenizer = build_toy_pair(config=HorizonPairConfig(), progress=False)
    held_out = make_dataset(settings["n_eval"], split="eval")
    preset = example_preset("horizon")
    temperature = settings["temperature"] or preset["temperature"]
    common = {"max_new_tokens": preset["max_completion_length"], "temperature": temperature, "seed": 0}
    result = {}
    for name, model in (("teacher", teacher), ("before", student)):
        accuracy = evaluate(model, tokenizer, held_out, k=settings["k"], batch_size=200, progress=False, **common)
        divergence = heldout_divergence(model, teacher, tokenizer, held_out, batch_size=100, progress=False, **common)
        result[name] = {**accuracy, **divergence}
    queue.put(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps per run at equal steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval_every", type=int, default=0, help="also evaluate every N steps (0: at the end only)")
    parser.add_argument("--per_device_train_batch_size", type=int, default=None, help="None: the preset's")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (None: the preset's)")
    parser.add_argument("--n_eval", type=int, default=100, help="held-out problems")
    parser.add_argument("--k", type=int, default=4, help="samples per problem for Avg@k / Pass@k")
    parser.add_argument("--ladder", type=float, nargs="+", default=[0.5, 0.75, 1.0],
                        help="curriculum lengths as fractions of the preset's max_completion_length")  # fmt: skip
    parser.add_argument("--min_entropy", default="0.8x", help="the curriculum's entropy gate")
    parser.add_argument("--objectives", nargs="*", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--no_equal_time", action="store_true", help="skip the equal-wall-time reruns")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "paper_tradeoffs.json")
    parser.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "paper_tradeoffs.png")
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--plot_only", action="store_true", help="re-plot `--out` without training")
    parser.add_argument("--resume", action="store_true", help="keep `--out`'s runs and add only the missing ones")
    args = parser.parse_args()
    if args.plot_only:
        report = json.loads(args.out.read_text())
    else:
        keys = ("steps", "eval_every", "n_eval", "k", "ladder", "min_entropy", "per_device_train_batch_size")
        keys += ("temperature",)
        settings = {key: getattr(args, key) for key in keys}
        if args.resume and args.out.exists():
            report = json.loads(args.out.read_text())
            changed = {key for key in keys if report["settings"].get(key) != settings[key]}
            if changed:
                raise ValueError(f"--resume: {args.out} was run with other {sorted(changed)}; pass them as then.")
        else:
            report = {"settings": settings, **run_in_child(_reference, settings=settings), "equal_steps": {}}
            report["equal_time"] = {}
        report["settings"]["seeds"] = sorted({*report["settings"].get("seeds", []), *args.seeds})

        def missing(phase: str, name: str, seed: int) -> bool:
            return all(run.get("seed") != seed for run in report[phase].get(name, []))

        def save() -> None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))

        for seed in args.seeds:  # every objective once before the next seed, so a cut-short run still compares
            for name in [name for name in args.objectives if missing("equal_steps", name, seed)]:
                run = run_in_child(_run, objective=OBJECTIVES[name], seed=seed, steps=args.steps, settings=settings)
                report["equal_steps"].setdefault(name, []).append({**run, "seed": seed})
                last = run["history"][-1]
                print(f"{name} seed {seed}: " + ", ".join(f"{key} {last[key]:.3f}" for key in METRICS)
                      + f", {last['train_seconds']:.0f} s", flush=True)  # fmt: skip
                save()
        reference = statistics.fmean(_final(report["equal_steps"].get(DEFAULT, []))["train_seconds"] or [0.0])
        for name in args.objectives if reference and not args.no_equal_time else []:
            runs = report["equal_steps"][name]
            seconds = statistics.fmean(_final(runs)["train_seconds"])
            if abs(seconds / reference - 1) <= 0.1:
                report["equal_time"][name] = runs
                continue
            steps = max(1, round(args.steps * reference / seconds))
            for seed in [seed for seed in args.seeds if missing("equal_time", name, seed)]:
                run = run_in_child(_run, objective=OBJECTIVES[name], seed=seed, steps=steps, settings=settings)
                report["equal_time"].setdefault(name, []).append({**run, "seed": seed})
                save()
            print(f"{name} at equal wall time ({steps} steps): {table_row(report, name)}", flush=True)
        save()
    text = (
        f"Teacher Avg@{report['settings']['k']} {report['teacher']['avg_at_k']:.3f}, student before "
        f"{report['before']['avg_at_k']:.3f}.\n\nEqual steps:\n\n{table(report, 'equal_steps')}\n\n"
        f"Equal training wall time:\n\n{table(report, 'equal_time')}\n"
    )
    write_results(report, args.out, text, args.markdown)
    plot(report, args.png)


def table_row(report: dict[str, Any], name: str) -> str:
    final = _final(report["equal_time"][name])
    return ", ".join(f"{key} {statistics.fmean(final[key]):.3f}" for key in METRICS)


if __name__ == "__main__":
    main()
