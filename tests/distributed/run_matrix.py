"""Train matrix cells (`cells.py`) for a few steps; each rank writes what it saw and its final weights to --out.

Run under `accelerate launch` (two processes: DDP, ZeRO-2, ZeRO-3, FSDP2) or with plain `python` (the single-process
reference of the same global batch). Per rank it writes `rank{r}.json` after every cell ({cell: result}) and
`weights/{cell}.rank{r}.pt` (the student's full final parameters, gathered under ZeRO-3 and FSDP2); the main process
also writes `weights/initial.pt`. A served cell's teacher is the server at --teacher_url (the harness serves
`build_pair`'s teacher there). A cell that raises is recorded with its error and the next one runs; the process
group times out after --collective_timeout seconds, so a rank left alone in a collective fails instead of hanging.

Determinism across process counts: every cell generates greedily (or takes teacher/dataset prefixes, the teacher's
generated greedily too), trains with plain SGD at a constant rate and without clipping (so a wrongly scaled gradient
moves the weights by a wrongly scaled step), and splits the same `GLOBAL_BATCH` rows per step over the processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from datasets import Dataset
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cells import FAULT_RANK, FAULT_STEP, MAX_STEPS, SEED, Cell, lookup  # noqa: E402
from conftest import make_config  # noqa: E402

from trl_opd import OPDTrainer  # noqa: E402
from trl_opd.callbacks import EntropyGatedLengthCurriculum, ScheduleCallback  # noqa: E402
from trl_opd.toy import build_model, build_tokenizer  # noqa: E402

HELD_OUT = [[{"role": "user", "content": f"{a}+{a + 1}?"}] for a in range(3)]
ROWS = 16
ROUTED_TEACHERS = ("alpha", "beta")  # a routed cell's teachers: the pair's teacher, and the student's initial weights


def matrix_dataset(n: int = ROWS, routed: bool = False) -> Dataset:
    """Prompts 'a+b?' (all of one length: no left padding) with gold completions of 1 to 7 tokens, so the ranks hold
    different numbers of loss tokens on dataset prefixes and a rank-local normalisation shows in the weights. With
    `routed`, a `teacher` column names 'alpha' on every fourth row and 'beta' on the others, so that a rank's rows
    often name one teacher only."""
    prompts, completions = [], []
    for i in range(n):
        a, b = i % 10, (3 * i + 1) % 10
        answer = [f"{a + b}", f"={a + b}", f"{a}+{b}={a + b}"][i % 3]
        prompts.append([{"role": "user", "content": f"{a}+{b}?"}])
        completions.append([{"role": "assistant", "content": answer}])
    columns = {"prompt": prompts, "completion": completions}
    if routed:
        columns["teacher"] = [ROUTED_TEACHERS[i % 4 != 0] for i in range(n)]
    return Dataset.from_dict(columns)


def enable_cpu_fsdp() -> None:
    """Let accelerate run FSDP on CPU processes (gloo), as `fully_shard` itself allows.

    accelerate 1.x turns `ACCELERATE_USE_FSDP` into `DistributedType.FSDP` only inside its accelerator-device branch
    of `AcceleratorState.__init__` (`distributed_type in [MULTI_GPU, MULTI_XPU, ...]`), so with no GPU the state stays
    `MULTI_CPU`, the plugin is dropped and `prepare_model` wraps in DDP. This wraps `__init__` to finish the job on
    `MULTI_CPU`, in `PartialState`'s shared state too: every `AcceleratorState()` copies `distributed_type` from it.
    """
    original = AcceleratorState.__init__

    def init(self, *args: Any, fsdp_plugin: FullyShardedDataParallelPlugin | None = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    AcceleratorState.__init__ = init


def save_pair(tokenizer, directory: Path) -> dict[str, str]:
    """Save the toy student and teacher (and the tokenizer) once; every rank then loads them by path."""
    paths = {"student": directory / "student", "teacher": directory / "teacher"}
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            for role, model in build_pair(tokenizer).items():
                model.save_pretrained(paths[role])
                tokenizer.save_pretrained(paths[role])
    return {role: str(path) for role, path in paths.items()}


def build_pair(tokenizer) -> dict[str, torch.nn.Module]:
    """The tiny student (hidden 32, one layer) and teacher (hidden 48, two layers) of `run_opd.py`."""
    return {
        "student": build_model(tokenizer, hidden_size=32, num_layers=1, seed=0),
        "teacher": build_model(tokenizer, hidden_size=48, num_layers=2, seed=1),
    }


def callbacks_of(cell: Cell) -> list[TrainerCallback]:
    """The cell's schedule (on a knob it reads) and length curriculum ([4, 8], advancing at step 1)."""
    callbacks: list[TrainerCallback] = []
    if "schedule" in cell.extras:
        callbacks.append(ScheduleCallback(*cell.schedule()))
    if "curriculum" in cell.extras:
        callbacks.append(
            EntropyGatedLengthCurriculum(
                [4, 8], min_entropy=0.0, check_every_steps=1, min_steps_per_stage=1, eval_prompts=HELD_OUT
            )
        )
    return callbacks


def inject_nan(trainer: OPDTrainer) -> None:
    """NaN teacher hidden states on rank FAULT_RANK during the training forward of step FAULT_STEP."""
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    rank = PartialState().process_index

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if rank == FAULT_RANK and trainer.state.global_step == FAULT_STEP and trainer.model.training:
            return torch.full_like(output, float("nan"))
        return None

    teacher.model.norm.register_forward_hook(hook)


def full_parameters(trainer: OPDTrainer) -> dict[str, torch.Tensor]:
    """The student's full parameters on every rank: gathered under ZeRO-3, `full_tensor()` of FSDP2's DTensors."""
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    parameters = dict(model.named_parameters())
    zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(parameters.values())):
            return {name: param.detach().clone().float().cpu() for name, param in parameters.items()}
    full = {}
    for name, param in parameters.items():
        tensor = param.detach()
        if isinstance(tensor, torch.distributed.tensor.DTensor):
            tensor = tensor.full_tensor()
        full[name] = tensor.clone().float().cpu()
    return full


def backend_of(trainer: OPDTrainer) -> dict[str, Any]:
    state = trainer.accelerator.state
    return {
        "distributed_type": str(state.distributed_type),
        "zero_stage": state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "zero3_init": bool(trainer.is_deepspeed_enabled and state.deepspeed_plugin.zero3_init_flag),
        "fsdp_version": state.fsdp_plugin.fsdp_version if trainer.is_fsdp_enabled else None,
        "wrapper": type(trainer.model_wrapped).__name__,
        "dtensor": any(isinstance(p, torch.distributed.tensor.DTensor) for p in trainer.model_wrapped.parameters()),
    }


def run_cell(
    cell: Cell, tokenizer, models: dict[str, str] | None, out: Path, teacher_url: str | None = None
) -> dict[str, Any]:
    """Train one cell; return what this rank saw (rows, prefixes, logs, warnings) and its weights' checksums."""
    state = PartialState()
    result: dict[str, Any] = {"rows": [], "student_prefix": [], "completions": []}
    started = time.perf_counter()
    trainer = None
    try:
        args = make_config(
            out / "runs" / cell.name,
            max_steps=MAX_STEPS,
            learning_rate=0.5,
            optim="sgd",
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            seed=SEED,
            generation_kwargs={"do_sample": False},
            use_cpu=not torch.cuda.is_available(),
            **cell.overrides(state.num_processes),
        )
        pair = models or build_pair(tokenizer)
        if cell.served and teacher_url is None:
            raise ValueError(f"{cell.name} needs the served teacher's URL: run with --teacher_url.")
        teacher = teacher_url if cell.served else pair["teacher"]
        if cell.routed:
            # beta is the student's initial weights: loaded again from its path, or a fresh copy (not the trained one)
            beta = pair["student"] if isinstance(pair["student"], str) else build_pair(tokenizer)["student"]
            teacher = dict(zip(ROUTED_TEACHERS, (pair["teacher"], beta)))
        trainer = OPDTrainer(
            model=pair["student"],
            teacher_model=teacher,
            args=args,
            train_dataset=matrix_dataset(routed=cell.routed),
            processing_class=tokenizer,
            callbacks=callbacks_of(cell),
        )
        if cell.fault == "nan_teacher":
            inject_nan(trainer)
        original = trainer._generate_and_score_completions

        def record(inputs: list[dict[str, Any]]) -> dict[str, Any]:
            output = original(inputs)
            result["rows"].append([row["prompt"][-1]["content"] for row in inputs])
            result["student_prefix"].append(trainer._metrics["train"]["opd/student_prefix"][-1])
            ids, mask = output["completion_ids"].cpu(), output["completion_mask"].cpu().bool()
            result["completions"].append([row[keep].tolist() for row, keep in zip(ids, mask)])
            return output

        trainer._generate_and_score_completions = record
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                trainer.train()
            finally:
                result["warnings"] = sorted({str(w.message) for w in caught if "Non-finite" in str(w.message)})
                result["backend"] = backend_of(trainer)  # after `train()`, which wraps the model
        weights = full_parameters(trainer)
        (out / "weights").mkdir(exist_ok=True)
        torch.save(weights, out / "weights" / f"{cell.name}.rank{state.process_index}.pt")
        result["checksums"] = {
            name: [float(tensor.double().sum()), float(tensor.double().square().sum())]
            for name, tensor in weights.items()
        }
        result["status"] = "ok"
    except Exception as error:  # recorded for the test to report; the next cell still runs
        result.update(status="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    if trainer is not None:
        result["logs"] = [
            {k: v for k, v in entry.items() if isinstance(v, (int, float))}
            for entry in trainer.state.log_history
            if "loss" in entry
        ]
        result["losses"] = [entry["loss"] for entry in result["logs"]]
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def write(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=1, default=str))
    partial.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cells", nargs="+", required=True, help="cell names (see cells.py)")
    parser.add_argument(
        "--from_paths",
        action="store_true",
        help="save the pair and hand OPDTrainer paths (default under ZeRO-3 with zero3_init_flag)",
    )
    parser.add_argument("--collective_timeout", type=float, default=90.0, help="process-group timeout (seconds)")
    parser.add_argument("--teacher_url", default=None, help="the served teacher of served cells (see harness.py)")
    cli = parser.parse_args()
    cells = [lookup(name) for name in cli.cells]
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        enable_cpu_fsdp()
    # As `TrainingArguments(use_cpu=True)` does (gloo), but first, so that the process group gets the timeout.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=cli.collective_timeout))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // state.num_processes))
    cli.out.mkdir(parents=True, exist_ok=True)
    (cli.out / "weights").mkdir(exist_ok=True)
    tokenizer = build_tokenizer()
    if state.is_main_process:
        initial = build_pair(tokenizer)["student"]
        torch.save({k: v.detach().float() for k, v in initial.named_parameters()}, cli.out / "weights" / "initial.pt")
    from_paths = cli.from_paths or os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true"
    models = save_pair(tokenizer, cli.out / "models") if from_paths else None
    report: dict[str, Any] = {
        "rank": state.process_index,
        "world_size": state.num_processes,
        "from_paths": from_paths,
        "cells": {},
    }
    for cell in cells:
        report["cells"][cell.name] = run_cell(cell, tokenizer, models, cli.out, cli.teacher_url)
        write(cli.out / f"rank{state.process_index}.json", report)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no process-group teardown: after a one-sided failure it could wait for the other rank forever


if __name__ == "__main__":
    main()
