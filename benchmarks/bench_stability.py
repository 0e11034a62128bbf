"""Provoke OPD's length inflation on the toy pair and watch the diagnostics flag it, with and without a stabiliser.

Pure reverse KL on student prefixes, a long generation budget and a high learning rate: the regime where Luo et al.
(arXiv 2604.08527) see truncation and repetition climb. Each run is a fresh child process; the script prints, per
logging step, `opd/truncation_rate`, `opd/repetition_rate`, mean completion length and `opd/log_ratio_repeated` vs
`opd/log_ratio_non_repeated`, then a summary table (`--markdown` appends it).

    python benchmarks/bench_stability.py --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import warnings
from pathlib import Path

from common import run_in_child, write_results

# (config overrides, CollapseGuard action): every run has a guard, so that its first alarm shows when the
# diagnostics flag the inflation; "shorten" is the guard used as a stabiliser.
RUNS = {
    "reverse KL (no stabiliser)": ({}, "warn"),
    "reverse KL + ref KL 0.5 + gold SFT 0.5 (Stable-OPD)": ({"ref_kl_coef": 0.5, "gold_sft_weight": 0.5}, "warn"),
    "reverse KL + CollapseGuard(action='shorten')": ({}, "shorten"),
    "mixed KL w=0.7": ({"kl_direction": "mixed", "forward_kl_weight": 0.7}, "warn"),
}
KEYS = ("opd/truncation_rate", "opd/repetition_rate", "completions/mean_length", "opd/student_entropy")
ALARM = re.compile(r"CollapseGuard at step (\d+)")  # the guard's warning, which names the step
GUARD_THRESHOLD = 0.3  # CollapseGuard's max truncation and repetition rates


def _run(overrides: dict, action: str, settings: dict, queue) -> None:
    import torch

    from trl_opd import CollapseGuard, OPDConfig, OPDTrainer
    from trl_opd.toy import build_toy_pair, make_dataset

    torch.set_num_threads(2)
    teacher, student, tokenizer = build_toy_pair(progress=False)
    base = dict(
        output_dir=tempfile.mkdtemp(),
        prefix_source="student",
        kl_direction="reverse",
        learning_rate=settings["lr"],
        lr_scheduler_type="constant",
        max_steps=settings["steps"],
        per_device_train_batch_size=settings["batch"],
        max_completion_length=settings["length"],
        logging_steps=settings["log_every"],
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        bf16=False,
        seed=0,
    )
    args = OPDConfig(**{**base, **overrides})
    trainer = OPDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=make_dataset(settings["steps"] * settings["batch"], split="train"),
        processing_class=tokenizer,
        callbacks=[CollapseGuard(GUARD_THRESHOLD, GUARD_THRESHOLD, action=action, min_length=32)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    alarms = [int(match[1]) for w in caught if (match := ALARM.match(str(w.message)))]
    history = [
        {"step": entry["step"], **{key: entry.get(key) for key in KEYS}}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    queue.put({"history": history, "alarm_steps": alarms})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=160, help="max_completion_length (toy answers need ~30)")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_stability.json"))
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    settings = {k: getattr(args, k) for k in ("steps", "batch", "length", "lr", "log_every")}
    results = {}
    for name, (overrides, action) in RUNS.items():
        results[name] = run_in_child(_run, overrides=overrides, action=action, settings=settings)
        for row in results[name]["history"]:
            print(name, json.dumps(row), flush=True)
    lines = [
        f"### Length inflation on the toy pair ({args.steps} steps, lr {args.lr}, max {args.length} new tokens)",
        "",
        f"Values at the first and last logging step; CollapseGuard thresholds {GUARD_THRESHOLD} (truncation and "
        "repetition rate).",
        "",
        "| run | truncation rate | repetition rate | mean length | student entropy | first guard alarm |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in results.items():
        first, last = run["history"][0], run["history"][-1]
        cells = [f"{first[key]:.2f} → {last[key]:.2f}" if last[key] is not None else "—" for key in KEYS]
        alarms = run["alarm_steps"]
        cells.append(f"step {alarms[0]} ({len(alarms)} in all)" if alarms else "none")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    write_results({"settings": settings, "results": results}, args.out, "\n".join(lines) + "\n", args.markdown)


if __name__ == "__main__":
    main()
