"""Release check: every backend × every cell of `tests/distributed/cells.py` against the single-process reference.

CI (`tests/test_distributed_matrix.py`) runs each backend on its own row of cells only; this runs the full cross
product (4 backends × 21 cells, the served-teacher cell included, on CPU, two processes each) and prints a table
backend × cell → pass/FAIL, then the first problem of each failure. Exit status 1 if any cell fails. Served cells get
a loopback teacher server from the harness for the duration of their launch.

    PYTHONPATH=. .venv/bin/python scripts/distributed_matrix.py                  # everything
    PYTHONPATH=. .venv/bin/python scripts/distributed_matrix.py --backends zero3 --ci   # one backend's CI row
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "distributed"))
import harness  # noqa: E402
from cells import BACKENDS, CELLS, CI_CELLS  # noqa: E402


def chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--cells", nargs="+", default=list(CELLS), help="cell names (default: all)")
    parser.add_argument("--ci", action="store_true", help="only each backend's CI row, as the test suite runs it")
    parser.add_argument("--out", type=Path, default=None, help="where runs are kept (default: a temporary folder)")
    parser.add_argument("--chunk", type=int, default=10, help="cells per launch (a crash loses at most a chunk)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per launch before it is killed")
    cli = parser.parse_args(argv)
    out = cli.out or Path(tempfile.mkdtemp(prefix="opd-matrix-"))
    backends = [b for b in cli.backends if not b.startswith("zero") or importlib.util.find_spec("deepspeed")]
    plan = {b: [c.name for c in CI_CELLS[b]] if cli.ci else list(cli.cells) for b in backends}
    needed = sorted({name for names in plan.values() for name in names})
    print(f"reference: {len(needed)} cells in one process", flush=True)
    reference = harness.launch(None, needed, out / "reference", timeout=cli.timeout)
    verdicts: dict[str, dict[str, str]] = {name: {} for name in needed}
    failures: list[str] = []
    for backend, names in plan.items():
        for index, chunk in enumerate(chunks(names, cli.chunk)):
            run = harness.launch(backend, chunk, out / backend / str(index), timeout=cli.timeout)
            print(f"{backend} [{index}]: {len(chunk)} cells in {run.seconds:.0f} s", flush=True)
            for name in chunk:
                problems = harness.check_cell(run, reference, name)
                verdicts[name][backend] = "FAIL" if problems else "pass"
                if problems:
                    failures.append(f"{backend} × {name}: {problems[0].splitlines()[0][:300]}")
    width = max(map(len, needed))
    print("\n" + "cell".ljust(width) + "".join(f"  {b:>6}" for b in backends))
    for name in needed:
        print(name.ljust(width) + "".join(f"  {verdicts[name].get(b, '-'):>6}" for b in backends))
    print("\n" + ("\n".join(failures) if failures else "all cells pass"))
    (out / "verdicts.json").write_text(json.dumps({"verdicts": verdicts, "failures": failures}, indent=1))
    print(f"\nruns and verdicts.json in {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
