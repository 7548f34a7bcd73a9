"""``notebooks/quickstart.ipynb``: committed without outputs, equal to what its generator
(``tools/make_quickstart_notebook.py``) writes, and executed top to bottom with nbclient at the
sizes of its parameters cell (a micro tokenizer and RAR on real MNIST digits, rFID/pFID, gFID).
CI runs it with ``COMPUTE_FIDS = False``; the whole notebook, FIDs included, is ``slow`` (seven
2048-d Fréchet distances and the Inception network dominate its time: ~4 min of CPU).

The kernel is this interpreter (jupyter_client runs a ``python`` kernelspec with
``sys.executable``) on one CPU device, in an empty directory, so ``configs/...`` resolves as
after a ``pip install`` (the installed configs), the way Colab runs it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
GENERATOR = os.path.join(REPO, "tools", "make_quickstart_notebook.py")


def _generator():
    spec = importlib.util.spec_from_file_location("make_quickstart_notebook", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_parameters(nb: nbformat.NotebookNode, **values) -> nbformat.NotebookNode:
    """Papermill's injection: a cell after the one tagged ``parameters`` that sets ``values``."""
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source, id="injected-parameters")
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)
    return nb


def test_committed_notebook_is_the_generated_one_without_outputs():
    with open(NOTEBOOK, encoding="utf-8") as f:
        committed = f.read()
    assert committed == _generator().render(), "run: python tools/make_quickstart_notebook.py"
    nb = nbformat.reads(committed, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.id
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    assert tags.count(["parameters"]) == 1
    assert "google.colab" in nb.cells[1].source and "--no-deps" in nb.cells[1].source


def execute(tmp_path, **parameters) -> tuple[str, int]:
    """Runs the notebook with ``parameters`` injected; (its printed text, its PNG outputs)."""
    nb = with_parameters(nbformat.read(NOTEBOOK, as_version=4),
                         WORKDIR=str(tmp_path / "runs"), **parameters)
    env = dict(
        os.environ,
        XLA_FLAGS="",  # one CPU device, as a user's machine (conftest.py sets 8 for this process)
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    client = NotebookClient(nb, kernel_name="python3", timeout=1200,
                            resources={"metadata": {"path": str(cwd)}})
    t0 = time.time()
    client.execute(env=env)  # a failing cell raises CellExecutionError with its traceback
    print(f"quickstart.ipynb {parameters} executed in {time.time() - t0:.0f} s")
    assert os.listdir(cwd) == []  # everything went under WORKDIR

    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                images += "image/png" in out.data
                text.append(out.data.get("text/plain", ""))
    return "\n".join(text), images


def test_notebook_runs_top_to_bottom_without_fids(tmp_path):
    """CI's run: every cell, with the FIDs (most of the CPU time) switched off."""
    text, images = execute(tmp_path, COMPUTE_FIDS=False)
    assert images == 2, text  # reconstructions, generator samples
    assert re.search(r"step 40: \{.*psnr", text), text
    assert "rFID/pFID skipped" in text and "8 class-balanced samples (gFID skipped" in text


@pytest.mark.slow
@pytest.mark.in_ci
def test_notebook_runs_top_to_bottom(tmp_path):
    text, images = execute(tmp_path)
    assert images == 3, text  # reconstructions, the pFID grid, the generator samples
    rfid = re.search(r"rFID (\S+), pFID (\S+), PSNR", text)
    assert rfid and all(math.isfinite(float(v.rstrip(","))) for v in rfid.groups()), text
    gfid = re.search(r"gFID (\S+) over (\d+) class-balanced samples", text)
    assert gfid and math.isfinite(float(gfid.group(1))) and int(gfid.group(2)) == 8, text
    assert os.path.exists(tmp_path / "runs" / "tokenizer_eval" / "pfid_grid.png")
