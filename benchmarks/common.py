"""What the benchmark scripts share: running one measurement in a fresh process, and writing its results."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import queue as queue_module
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_in_child(target: Callable[..., None], **kwargs: Any) -> Any:
    """Run `target(**kwargs, queue=...)` in a fresh spawned process and return what it puts on the queue.

    A fresh process per measurement gives each its own peak memory and no warm caches from the previous one. A child
    that dies without a result (a crash, the OOM killer) raises here instead of leaving the parent waiting.
    """
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, kwargs={**kwargs, "queue": queue})
    process.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not process.is_alive():
                raise RuntimeError(f"{target.__name__} exited with code {process.exitcode} before reporting") from None
    process.join()
    return result


def write_results(report: dict, out: Path, table: str, markdown: Path | None) -> None:
    """Print the table, write the JSON report to `out`, and append the table to `markdown` if given."""
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if markdown:
        with markdown.open("a") as handle:
            handle.write("\n" + table)


def example_preset(name: str) -> dict[str, Any]:
    """The `OPDConfig` fields of examples/opd_math.py's preset `name` ('horizon': the main job's settings)."""
    import dataclasses

    from trl_opd import OPDConfig

    path = Path(__file__).resolve().parent.parent / "examples" / "opd_math.py"
    spec = importlib.util.spec_from_file_location("opd_math", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the script's annotations through it
    spec.loader.exec_module(module)
    fields = {field.name for field in dataclasses.fields(OPDConfig)}
    return {key: value for key, value in module.PRESETS[name].items() if key in fields}
