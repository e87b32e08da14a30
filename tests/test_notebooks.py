"""The learner notebooks run top to bottom, so they cannot drift from the package (STYLE.md 13).

One cold-started toy agent is built per test session, in a temporary folder the notebooks find
through ARPO_NOTEBOOK_AGENT (their default is runs/notebooks_agent/), and is shared by all of
them. Their training runs take 3 steps here (ARPO_NOTEBOOK_TRAIN_STEPS), as many as a reader's
run otherwise. Each notebook runs in a fresh kernel of THIS interpreter (a kernelspec written for the
session, so a user-level `python3` kernel pointing at another Python cannot be picked up), with
notebooks/ as its working directory. A cell that raises fails the notebook's test.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
KERNEL_NAME = "python3"
CELL_TIMEOUT_SECONDS = 300


def _load_shared():
    """notebooks/_shared.py under a name that cannot clash with another test's module."""
    spec = importlib.util.spec_from_file_location("arpo_ref_notebooks_shared", NOTEBOOK_DIR / "_shared.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def notebook_environment(tmp_path_factory):
    """Build the shared agent once; point the notebooks' kernels at it and at this interpreter."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("kernel")
    install(kernel_name=KERNEL_NAME, prefix=str(prefix))  # argv[0] = sys.executable
    agent = tmp_path_factory.mktemp("notebooks") / "agent"
    _load_shared().build_agent(agent, log=lambda *args: None)
    saved = {key: os.environ.get(key) for key in ("ARPO_NOTEBOOK_AGENT", "JUPYTER_PATH", "ARPO_NOTEBOOK_TRAIN_STEPS")}
    os.environ["ARPO_NOTEBOOK_AGENT"] = str(agent)
    os.environ["ARPO_NOTEBOOK_TRAIN_STEPS"] = "3"  # the training runs of notebooks 04 and 05: 10 and 8 steps for a reader
    # JUPYTER_PATH is searched before the user's and the environment's kernel folders.
    os.environ["JUPYTER_PATH"] = os.pathsep.join(
        p for p in (str(prefix / "share" / "jupyter"), saved["JUPYTER_PATH"]) if p)
    yield agent
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_there_are_notebooks():
    assert len(NOTEBOOKS) == 5, [path.name for path in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_committed_notebook_is_clean(path):
    """Outputs stripped (no stale results, no megabytes of images in git) and a measured runtime
    stated in the first cell."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    first = notebook.cells[0]
    assert first.cell_type == "markdown" and re.search(r"\*\*Runtime\*\*.*?\d+ s\b", first.source, re.S), (
        f"{path.name}: the first cell must state the measured runtime ('**Runtime** ... N s')")
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{path.name}: cell {index} has outputs; commit notebooks with outputs stripped")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, notebook_environment):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_SECONDS, kernel_name=KERNEL_NAME,
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError naming the cell and its traceback
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if output.output_type == "error"]
    assert not errors
