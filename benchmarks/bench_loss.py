"""Loss forward+backward time and peak memory: trl-opd's supports vs `trl.DistillationTrainer`'s full-vocabulary loss.

Every path starts from the same student/teacher hidden states and `lm_head` weights (what the trainer has after the
backbones) and runs the loss's forward and backward:

- `trl_full`: `trl.trainer.distillation_trainer._chunked_divergence_loss`, exactly DistillationTrainer's loss;
- `full`, `teacher_topk`, `student_topk`, `union_topk` (± tail), `sampled_token`: trl-opd's
  `trl_opd.chunked.divergence_from_hidden`.

Each measurement runs in a fresh child process (one script run, many children) so peak memory is its own: on CUDA,
`torch.cuda.max_memory_allocated` above the inputs; on CPU, peak RSS (`ru_maxrss`) above the RSS once inputs exist.
Results: a JSON file and a Markdown table of times, memories and ratios to `trl_full` (`--markdown` appends it).

    python benchmarks/bench_loss.py                      # the issue's grid: V ∈ {32k, 152k}, T ∈ {512, 2048}
    python benchmarks/bench_loss.py --vocab 4096 --tokens 128 --k 16 --repeats 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from common import run_in_child, write_results

PATHS = ("trl_full", "full", "teacher_topk", "student_topk", "union_topk", "teacher_topk+tail", "sampled_token")
TOPK_PATHS = ("teacher_topk", "student_topk", "union_topk", "teacher_topk+tail")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _measure(
    path: str, vocab: int, tokens: int, hidden: int, k: int, dtype: str, repeats: int, warmup: int, queue
) -> None:
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from trl_opd.chunked import divergence_from_hidden
    from trl_opd.heads import OutputHead
    from trl_opd.losses import Divergence

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, dtype)
    student_hidden = torch.randn(tokens, hidden, device=device, dtype=torch_dtype, requires_grad=True)
    teacher_hidden = torch.randn(tokens, hidden, device=device, dtype=torch_dtype)
    student_weight = (torch.randn(vocab, hidden, device=device) * hidden**-0.5).to(torch_dtype).requires_grad_(True)
    teacher_weight = (torch.randn(vocab, hidden, device=device) * hidden**-0.5).to(torch_dtype)
    token_ids = torch.randint(0, vocab, (tokens,), device=device)

    def step() -> None:
        if path == "trl_full":
            loss, _, _ = _chunked_divergence_loss(
                student_hidden[None],
                teacher_hidden[None],
                student_weight,
                teacher_weight,
                torch.ones(1, tokens, device=device),
                beta=1.0,
            )
        else:
            support, _, tail = path.partition("+")
            divergence, _ = divergence_from_hidden(
                student_hidden,
                teacher_hidden,
                OutputHead(student_weight),
                OutputHead(teacher_weight),
                Divergence("reverse", loss_support=support, loss_top_k=k, loss_add_tail=bool(tail)),
                token_ids,
            )
            loss = divergence.mean()
        loss.backward()
        student_hidden.grad = student_weight.grad = None

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        sync()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = _rss_bytes()
    for _ in range(warmup):  # kernel compilation, allocator growth
        step()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    queue.put({"seconds": statistics.median(times), "peak_bytes": max(peak, 0)})


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def markdown(results: list[dict], device: str) -> str:
    lines = [
        f"### Loss forward+backward, reverse KL — {device}",
        "",
        "Ratios are `trl_full` (DistillationTrainer's loss) divided by the path: > 1 is faster / leaner.",
        "",
        "| V | T | path | k | time (s) | speed-up vs trl_full | peak extra memory (MiB) | memory ratio vs trl_full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        lines.append(
            f"| {row['vocab']} | {row['tokens']} | {row['path']} | {row['k'] or '—'} | {row['seconds']:.3f} | "
            f"{row['speedup']:.2f}× | {row['peak_bytes'] / 2**20:.0f} | {row['memory_ratio']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--k", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--hidden", type=int, default=896, help="hidden size (896: Qwen2.5-0.5B)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (0 on slow CPUs for big shapes)")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_loss.json"))
    parser.add_argument("--markdown", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    device = device_name()
    results = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            baseline = None
            for path in args.paths:
                for k in args.k if path in TOPK_PATHS else [None]:
                    measured = run_in_child(
                        _measure,
                        path=path,
                        vocab=vocab,
                        tokens=tokens,
                        hidden=args.hidden,
                        k=k or 1,
                        dtype=dtype,
                        repeats=args.repeats,
                        warmup=args.warmup,
                    )
                    row = {"vocab": vocab, "tokens": tokens, "path": path, "k": k, **measured}
                    if path == "trl_full":
                        baseline = row
                    reference = baseline or row
                    row["speedup"] = reference["seconds"] / row["seconds"]
                    row["memory_ratio"] = reference["peak_bytes"] / max(row["peak_bytes"], 1)
                    results.append(row)
                    print(json.dumps(row), flush=True)
    report = {"device": device, "dtype": dtype, "hidden": args.hidden, "torch": torch.__version__, "results": results}
    write_results(report, args.out, markdown(results, f"{device}, {dtype}, H={args.hidden}"), args.markdown)


if __name__ == "__main__":
    main()
