"""`examples/notebooks/opd_quickstart.ipynb` executes top to bottom (its quick variant: a small pair, a short run)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples/notebooks/opd_quickstart.ipynb"
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("TRL_OPD_CACHE", str(tmp_path / "cache"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    printed = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert re.search(r"student after \d\.\d\d\s+gap recovery -?\d\.\d\d", printed), printed[-2000:]
    assert os.path.isdir(tmp_path / "opd-notebook")
