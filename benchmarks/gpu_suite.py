"""The GPU suite: `OPDTrainer` side by side with `trl.DistillationTrainer` on GPU-sized models, in one command.

    python benchmarks/gpu_suite.py            # on a machine with a CUDA GPU: JSON + a table appended to the docs
    python benchmarks/gpu_suite.py --smoke    # tiny shapes on the CPU (what CI runs, so that the suite cannot rot)

Every model has random weights built from a `transformers` config shaped like a real checkpoint (nothing is read
from the Hub); prompts are toy-math problems over trl-opd's in-process toy tokenizer, whose ids all lie inside the
models' 151,936-token vocabulary. Each measurement runs in a fresh process, OPD and TRL under the same settings in
the same suite run, and every cell reports OPD / TRL ratios of time and peak memory (< 1: OPD is faster / leaner):

- `support_full`, `support_teacher_topk`, `support_sampled_token`: bf16 training step (generation included) of a
  Qwen2.5-0.5B-shaped student with a Qwen2.5-1.5B-shaped teacher; OPD at the full vocabulary, the teacher's top 32
  and the sampled token, each against DistillationTrainer (full vocabulary, its only support; run once).
- `zero3`, `fsdp2`: the same pair and step (OPD at the full vocabulary) under a one-process `accelerate launch` of
  `configs/accelerate/zero3.yaml` / `fsdp2.yaml`; a launch that fails, or whose run does not end up under
  DeepSpeed / FSDP, is recorded as failed with its error.
- `lora`, `qlora`: a Qwen3-1.7B-shaped student with LoRA (r = 16, all linear layers) and a Qwen3-8B-shaped teacher,
  in bf16, or with both base models in 4-bit NF4 (QLoRA: the random weights are saved to a temporary folder, then
  loaded with a `BitsAndBytesConfig`): peak memory, and whether it fits a 24 GB card (peak reserved memory at most
  22 GiB: what an A10G or L4 leaves to PyTorch after its CUDA context).
- `loss_teacher_topk`: the loss alone, forward + backward, from hidden states and `lm_head` weights (Qwen2.5-0.5B's
  width 896, V = 151,936, T = 8,192 positions, bf16): `trl_opd.chunked.divergence_from_hidden` on the teacher's top
  32 against `trl.trainer.distillation_trainer._chunked_divergence_loss`, DistillationTrainer's own loss
  (`benchmarks/bench_loss.py`'s measurement).

Step time is the median, over the timed steps after the warm-up, of the wall time from `on_step_begin` to
`on_step_end` with `torch.cuda.synchronize()` at both ends. Peak memory is the child process's
`torch.cuda.max_memory_allocated()` (models included; above the inputs for the loss cell), or its peak RSS in the
CPU smoke run. A cell whose run fails (out of memory included) is recorded as failed with its error; a cell that
needs a missing package, or CUDA in the smoke run, is recorded as skipped with the reason.

What a bare GPU machine needs besides torch, transformers, accelerate and peft (in parentheses, the versions this was
written against): trl==1.16.* and datasets (5.2.0) for every cell, deepspeed (0.19.8) for `zero3`, bitsandbytes for
`qlora`, and the dependencies of these that torch and transformers do not bring: pyarrow, pandas, python-dateutil,
tzdata, six, dill, multiprocess, xxhash (trl, datasets); einops, hjson, msgpack, ninja, py-cpuinfo, pydantic,
pydantic-core, annotated-types, typing-inspection (deepspeed); bitsandbytes needs only torch, numpy and packaging.
trl-opd itself is imported from this checkout. Without network,
bring the wheels: fetch them on a networked machine with the GPU machine's Python version and platform (DeepSpeed
publishes only a source distribution: build its pure-Python wheel there, with torch installed; its CUDA ops are
compiled on first use, and this suite uses none), then install them offline:

    pip download --only-binary=:all: --no-deps -d wheels "trl==1.16.*" datasets bitsandbytes pyarrow pandas \\
        python-dateutil tzdata six dill multiprocess xxhash einops hjson msgpack ninja py-cpuinfo pydantic \\
        pydantic-core annotated-types typing-inspection
    pip wheel --no-deps --no-build-isolation -w wheels deepspeed
    # on the GPU machine (pip says which wheel is missing, if any):
    pip install --no-index --find-links wheels trl datasets deepspeed bitsandbytes
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from bench_loss import _measure as measure_loss
from common import run_in_child, write_results
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # trl_opd from this checkout, installed or not (children inherit sys.path)

VOCAB = 151936  # the Qwen2.5 and Qwen3 vocabulary
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "Qwen2.5-0.5B": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True)),
    "Qwen2.5-1.5B": ("qwen2", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True)),
    "Qwen3-1.7B": ("qwen3", dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                 intermediate_size=6144, head_dim=128, tie_word_embeddings=True)),
    "Qwen3-8B": ("qwen3", dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                               intermediate_size=12288, head_dim=128, tie_word_embeddings=False)),
}  # fmt: skip
PAIRS = {"qwen2.5": ("Qwen2.5-0.5B", "Qwen2.5-1.5B"), "qwen3": ("Qwen3-1.7B", "Qwen3-8B")}  # (student, teacher)
# --smoke: every shape shrunk to this (vocabulary 256: larger than the toy tokenizer's, as the real shapes are)
SMOKE_SHAPE = dict(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=64, head_dim=16)  # fmt: skip

SETTINGS = {
    "gpu": dict(batch=8, length=256, warmup=1, steps=3, loss_tokens=8192, loss_vocab=VOCAB, loss_hidden=896,
                loss_k=32, loss_repeats=3),
    "smoke": dict(batch=2, length=8, warmup=1, steps=1, loss_tokens=64, loss_vocab=256, loss_hidden=32, loss_k=8,
                  loss_repeats=1),
}  # fmt: skip
SUPPORTS = {
    "full": {},
    "teacher_topk": {"loss_support": "teacher_topk", "loss_top_k": 32},
    "sampled_token": {"loss_support": "sampled_token"},
}
# cell: (accelerate config, the distributed type the launched run must report)
LAUNCH_CONFIGS = {
    "zero3": ("configs/accelerate/zero3.yaml", "DEEPSPEED"),
    "fsdp2": ("configs/accelerate/fsdp2.yaml", "FSDP"),
}
CELLS = {  # name: what the table says it measures
    "support_full": "Qwen2.5-0.5B ← 1.5B, OPD full vocabulary",
    "support_teacher_topk": "Qwen2.5-0.5B ← 1.5B, OPD teacher top-32",
    "support_sampled_token": "Qwen2.5-0.5B ← 1.5B, OPD sampled token",
    "zero3": "Qwen2.5-0.5B ← 1.5B, ZeRO-3 on 1 GPU, OPD full",
    "fsdp2": "Qwen2.5-0.5B ← 1.5B, FSDP2 on 1 GPU, OPD full",
    "lora": "Qwen3-1.7B + LoRA ← 8B, bf16, OPD full",
    "qlora": "Qwen3-1.7B 4-bit + LoRA ← 8B 4-bit, OPD full",
    "loss_teacher_topk": "loss forward+backward, OPD teacher top-k vs TRL's kernel",
}
LAUNCH_TIMEOUT_S = 1800  # a launched run that hangs (a stuck rendezvous) fails its cell instead of the suite
NEEDS = {"zero3": ("deepspeed",), "qlora": ("bitsandbytes",)}  # beyond what every cell needs
FITS_24GB_BYTES = 22 * 2**30  # what a 24 GB card (A10G, L4: 22.5 GiB visible) leaves after its CUDA context


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (generation, teacher, loss, backward, optimizer), CUDA-synchronised."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._start = self._now()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.times.append(self._now() - self._start)


def model_config(shape: str, smoke: bool, tokenizer) -> Any:
    """The `transformers` config of `shape` (or its tiny smoke version), with the toy tokenizer's pad/EOS ids."""
    from transformers import Qwen2Config, Qwen3Config

    family, sizes = SHAPES[shape]
    config_class = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    return config_class(
        **{"vocab_size": VOCAB, **sizes, **(SMOKE_SHAPE if smoke else {})},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def random_model(shape: str, smoke: bool, tokenizer, seed: int) -> Any:
    """A randomly initialised causal LM of `shape`: bf16 on the GPU, float32 on the CPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        return AutoModelForCausalLM.from_config(
            model_config(shape, smoke, tokenizer), dtype=torch.bfloat16 if cuda else torch.float32
        )


def load_pair(run: dict, smoke: bool, tokenizer) -> tuple[Any, Any]:
    """The (student, teacher) of `run`: random models, or 4-bit loads of saved random weights for QLoRA."""
    if run.get("adapter") == "qlora":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
        student, teacher = (
            AutoModelForCausalLM.from_pretrained(
                run["weights"][role], quantization_config=quantization, dtype=torch.bfloat16, device_map={"": 0}
            )
            for role in ("student", "teacher")
        )
        return student, teacher
    student_shape, teacher_shape = PAIRS[run["pair"]]
    return random_model(student_shape, smoke, tokenizer, 0), random_model(teacher_shape, smoke, tokenizer, 1)


def peak_memory() -> dict[str, Any]:
    """This process's peak memory so far: CUDA allocator peaks (and whether they fit a 24 GB card), or peak RSS."""
    if not torch.cuda.is_available():
        return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    reserved = torch.cuda.max_memory_reserved()
    return {
        "peak_bytes": torch.cuda.max_memory_allocated(),
        "peak_reserved_bytes": reserved,
        "fits_24gb": reserved <= FITS_24GB_BYTES,
    }


def train(run: dict, settings: dict) -> dict:
    """Train `run` ("trainer": "opd" or "trl", "pair", OPD overrides, adapter) for the warm-up and timed steps."""
    from peft import LoraConfig
    from trl import DistillationConfig, DistillationTrainer

    from trl_opd import OPDConfig, OPDTrainer
    from trl_opd.toy import build_tokenizer, make_dataset

    smoke = not torch.cuda.is_available()
    if smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    tokenizer = build_tokenizer()
    student, teacher = load_pair(run, smoke, tokenizer)
    total_steps = settings["warmup"] + settings["steps"]
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        fields = dict(
            output_dir=output_dir,
            max_steps=total_steps,
            per_device_train_batch_size=settings["batch"],
            max_completion_length=settings["length"],
            learning_rate=1e-5,
            logging_steps=1,  # trl-opd's diagnostics on every step: its worst case
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            bf16=not smoke,
            seed=0,
        )
        if run["trainer"] == "trl":
            trainer_class, args = DistillationTrainer, DistillationConfig(**fields)
        else:
            trainer_class, args = OPDTrainer, OPDConfig(**fields, **run.get("opd", {}))
        adapter = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = trainer_class(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=make_dataset(settings["batch"] * total_steps),
            processing_class=tokenizer,
            callbacks=[timer],
            peft_config=adapter if run.get("adapter") else None,
        )
        trainer.train()
    timed = timer.times[settings["warmup"] :]
    return {
        "status": "ok",
        "seconds": statistics.median(timed),
        "step_times": timer.times,
        "distributed_type": trainer.accelerator.distributed_type.value,
        **peak_memory(),
    }


def _train_in_child(run: dict, settings: dict, queue) -> None:
    try:
        queue.put(train(run, settings))
    except Exception as error:  # out of memory included: a failed run is a result of the suite, not its end
        queue.put({"status": "failed", "error": f"{type(error).__name__}: {error}"[:2000]})


def _save_random_model(shape: str, path: str, seed: int, queue) -> None:
    from trl_opd.toy import build_tokenizer

    random_model(shape, False, build_tokenizer(), seed).save_pretrained(path)
    queue.put({"status": "ok"})


def in_child(target, **kwargs: Any) -> dict:
    """`run_in_child(target, **kwargs)`, with a child that dies without a result (a crash) recorded as failed."""
    try:
        return run_in_child(target, **kwargs)
    except RuntimeError as error:
        return {"status": "failed", "error": str(error)}


def free_port() -> int:
    """A TCP port nothing listens on now, for the launcher's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launched(run: dict, settings: dict, config: str, distributed_type: str) -> dict:
    """`train(run, settings)` under a one-process `accelerate launch --config_file config` of this script; a run
    that did not end up under `distributed_type` counts as failed."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "result.json"
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / config),
            "--num_processes", "1", "--main_process_port", str(free_port()), __file__,
            "--cell", json.dumps({"run": run, "settings": settings}), "--cell-out", str(out),
        ]  # fmt: skip
        try:
            completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"no result within {LAUNCH_TIMEOUT_S} s"}
        if completed.returncode != 0 or not out.exists():
            return {"status": "failed", "error": f"exit code {completed.returncode}: {completed.stderr[-2000:]}"}
        result = json.loads(out.read_text())
    if result["distributed_type"] != distributed_type:
        result.update(status="failed", error=f"ran as {result['distributed_type']}, not {distributed_type}")
    return result


def compare(opd: dict, trl: dict) -> dict:
    """A cell: both measurements, and OPD / TRL ratios of time and peak memory when both ran."""
    cell = {"opd": opd, "trl": trl}
    if opd["status"] == trl["status"] == "ok":
        cell.update(
            status="ok",
            time_ratio=opd["seconds"] / trl["seconds"],
            memory_ratio=opd["peak_bytes"] / trl["peak_bytes"],
        )
    else:
        cell["status"] = "failed"
    return cell


def skip_reason(name: str, smoke: bool) -> str | None:
    """Why cell `name` cannot run here (CUDA in the smoke run, a missing package), or None."""
    if smoke and name in (*LAUNCH_CONFIGS, "qlora"):
        return "needs CUDA"
    missing = [module for module in NEEDS.get(name, ()) if importlib.util.find_spec(module) is None]
    return f"needs {', '.join(missing)} (see the module docstring)" if missing else None


def run_cells(names: list[str], settings: dict, smoke: bool) -> dict[str, dict]:
    """Measure the cells `names`, in order; DistillationTrainer's plain run is measured once for every support."""
    cells: dict[str, dict] = {}
    trl_reference = None
    for name in names:
        reason = skip_reason(name, smoke)
        if reason:
            cells[name] = {"status": "skipped", "reason": reason}
        elif name.startswith("support_"):
            base = {"pair": "qwen2.5"}
            trl_reference = trl_reference or in_child(
                _train_in_child, run={**base, "trainer": "trl"}, settings=settings
            )
            opd_run = {**base, "trainer": "opd", "opd": SUPPORTS[name.removeprefix("support_")]}
            cells[name] = compare(in_child(_train_in_child, run=opd_run, settings=settings), trl_reference)
        elif name in LAUNCH_CONFIGS:
            runs = [{"pair": "qwen2.5", "trainer": trainer} for trainer in ("opd", "trl")]
            cells[name] = compare(*(launched(run, settings, *LAUNCH_CONFIGS[name]) for run in runs))
        elif name in ("lora", "qlora"):
            cells[name] = adapter_cell(name, settings)
        else:
            cells[name] = loss_cell(settings, smoke)
        print(name, json.dumps(cells[name]), flush=True)
    return cells


def adapter_cell(adapter: str, settings: dict) -> dict:
    """OPD and TRL with a LoRA student, its base and the teacher in bf16 or (QLoRA) loaded in 4-bit."""
    with tempfile.TemporaryDirectory() as folder:
        base = {"pair": "qwen3", "adapter": adapter}
        if adapter == "qlora":
            base["weights"] = {role: str(Path(folder) / role) for role in ("student", "teacher")}
            for seed, (role, shape) in enumerate(zip(("student", "teacher"), PAIRS["qwen3"])):
                saved = in_child(_save_random_model, shape=shape, path=base["weights"][role], seed=seed)
                if saved["status"] != "ok":
                    return {"status": "failed", "reason": f"saving the random {shape}: {saved['error']}"}
        opd, trl = (in_child(_train_in_child, run={**base, "trainer": t}, settings=settings) for t in ("opd", "trl"))
        return compare(opd, trl)


def loss_cell(settings: dict, smoke: bool) -> dict:
    """The top-k loss against DistillationTrainer's chunked full-vocabulary kernel, forward + backward."""
    shape = dict(
        vocab=settings["loss_vocab"],
        tokens=settings["loss_tokens"],
        hidden=settings["loss_hidden"],
        k=settings["loss_k"],
        dtype="float32" if smoke else "bfloat16",
        repeats=settings["loss_repeats"],
        warmup=1,
    )
    # a child that crashed carries its own "failed" status, which overrides "ok"
    opd, trl = (
        {"status": "ok", **in_child(measure_loss, path=path, **shape)} for path in ("teacher_topk", "trl_full")
    )
    return {**compare(opd, trl), "shape": shape}


def _put_device_name(queue) -> None:
    queue.put(torch.cuda.get_device_name())


def device_name(smoke: bool) -> str:
    """The GPU's name, asked in a child so that this process never holds a CUDA context; or "CPU smoke"."""
    return "CPU smoke" if smoke else run_in_child(_put_device_name)


def markdown(report: dict) -> str:
    """The report as a Markdown table: one row per cell, OPD and TRL side by side with their ratios."""
    settings, smoke = report["settings"], report["smoke"]
    memory = "peak RSS of each run's process" if smoke else "`torch.cuda.max_memory_allocated` of each run's process"
    loss = report["cells"].get("loss_teacher_topk", {}).get("shape")
    loss_shape = (
        f" Loss cell: H={loss['hidden']}, V={loss['vocab']}, T={loss['tokens']}, k={loss['k']}." if loss else ""
    )
    lines = [
        f"### GPU suite — {report['device']} (torch {report['torch']}, trl {report['trl']}, "
        f"transformers {report['transformers']}, {report['date']})",
        "",
        f"`python benchmarks/gpu_suite.py{' --smoke' if smoke else ''}`{' (tiny shapes)' if smoke else ''}: "
        f"batch {settings['batch']}, {settings['length']} new tokens, step time the median over "
        f"{settings['steps']} timed step(s) after {settings['warmup']} warm-up step(s).{loss_shape} Peak memory: "
        f"{memory} (the loss cell: above its inputs). Ratios are OPD / TRL: < 1 is faster / leaner. Fits 24 GB: "
        "peak reserved memory ≤ 22 GiB.",
        "",
        "| cell | setup | OPD time (s) | TRL time (s) | time OPD/TRL | OPD peak (MiB) | TRL peak (MiB) "
        "| memory OPD/TRL | fits 24 GB (OPD / TRL) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cell in report["cells"].items():
        if cell["status"] != "ok":
            why = cell.get("reason") or "; ".join(
                f"{side}: {_tail(cell[side].get('error', 'ok'))}" for side in ("opd", "trl") if side in cell
            )
            lines.append(f"| {name} | {CELLS[name]} | {cell['status']}: {why} |||||||")
            continue
        opd, trl = cell["opd"], cell["trl"]
        fits = " / ".join("yes" if run["fits_24gb"] else "no" for run in (opd, trl)) if "fits_24gb" in opd else "—"
        lines.append(
            f"| {name} | {CELLS[name]} | {opd['seconds']:.3f} | {trl['seconds']:.3f} | {cell['time_ratio']:.2f} "
            f"| {opd['peak_bytes'] / 2**20:.0f} | {trl['peak_bytes'] / 2**20:.0f} | {cell['memory_ratio']:.2f} "
            f"| {fits} |"
        )
    return "\n".join(lines) + "\n"


def _tail(error: str, limit: int = 160) -> str:
    """The end of an error message (where a traceback names the error) on one line, fit for a table cell."""
    return " ".join(error.split())[-limit:].replace("|", "/")


def run_launched_cell(cell: str, out: Path) -> None:
    """The `accelerate launch`ed side of `launched`: one training run, its result written by the main process."""
    from accelerate import PartialState

    spec = json.loads(cell)
    result = train(spec["run"], spec["settings"])
    if PartialState().is_main_process:
        out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, GPU-only cells skipped")
    parser.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS), help="default: all")
    parser.add_argument("--out", type=Path, help="JSON report (default: benchmarks/results/gpu_suite_<device>.json)")
    parser.add_argument("--docs", type=Path, help="append the table here (default: docs/benchmarks.md; smoke: none)")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # the runner side of an `accelerate launch`
    parser.add_argument("--cell-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        run_launched_cell(args.cell, args.cell_out)
        return
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA is first queried; the children inherit it
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: the suite measures GPU runs. Pass --smoke for the tiny CPU smoke run.")
    settings = SETTINGS["smoke" if args.smoke else "gpu"]
    device = device_name(args.smoke)
    cells = run_cells(args.cells, settings, args.smoke)
    report = {
        "device": device,
        "smoke": args.smoke,
        "torch": torch.__version__,
        "trl": version("trl"),
        "transformers": version("transformers"),
        "date": datetime.date.today().isoformat(),
        "settings": settings,
        "cells": cells,
    }
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu_suite_{slug}.json"
    docs = args.docs or (None if args.smoke else ROOT / "docs" / "benchmarks.md")
    write_results(report, out, markdown(report), docs)


if __name__ == "__main__":
    main()
