"""Two OPD steps under `accelerate launch`; each rank writes what it drew and the losses it saw to --out."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import make_config, make_dataset  # noqa: E402

from trl_opd import OPDTrainer  # noqa: E402
from trl_opd.toy import build_model, build_tokenizer  # noqa: E402

SUPPORT_SETTINGS = {
    # support: prefix source and direction it is meaningful with; "mixed" draws student then teacher with seed 4
    "full": {"prefix_source": "mixed", "kl_direction": "mixed"},
    "teacher_topk": {"prefix_source": "mixed", "kl_direction": "mixed"},
    "sampled_token": {"prefix_source": "student", "kl_direction": "reverse"},
}


def run(tokenizer, out: Path, loss_support: str) -> dict:
    args = make_config(
        out / loss_support,
        max_steps=2,
        per_device_train_batch_size=2,
        off_policy_source="teacher",
        student_prefix_fraction=0.5,
        loss_support=loss_support,
        loss_top_k=8,
        save_strategy="no",
        seed=4,
        use_cpu=not torch.cuda.is_available(),  # gloo on CPU under the torchrun launcher
        **SUPPORT_SETTINGS[loss_support],
    )
    trainer = OPDTrainer(
        model=build_model(tokenizer, hidden_size=32, num_layers=1, seed=0),
        teacher_model=build_model(tokenizer, hidden_size=48, num_layers=2, seed=1),
        args=args,
        train_dataset=make_dataset(16),
        processing_class=tokenizer,
    )
    sources = []
    original = trainer._generate_and_score_completions

    def record(inputs):
        output = original(inputs)
        sources.append(trainer._metrics["train"]["opd/student_prefix"][-1])
        return output

    trainer._generate_and_score_completions = record
    trainer.train()
    zero_stage = trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None
    parameters = dict(trainer.model.named_parameters())
    gather = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(parameters.values()))
    with gather:
        checksums = {name: float(param.detach().double().sum()) for name, param in parameters.items()}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "student_prefix": sources,
        "losses": losses,
        "finite": bool(all(torch.isfinite(torch.tensor(losses)))),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "zero_stage": zero_stage,
        "checksums": checksums,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--loss_support", nargs="+", default=["full"], choices=list(SUPPORT_SETTINGS))
    cli = parser.parse_args()
    tokenizer = build_tokenizer()
    state = PartialState()
    results = {support: run(tokenizer, cli.out, support) for support in cli.loss_support}
    result = {"rank": state.process_index, "world_size": state.num_processes, "runs": results}
    (cli.out / f"rank{state.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
