"""Every notebook in notebooks/ runs top to bottom: on a store with two quick runs of two backbones, and on an
empty store. The kernel is this interpreter (a kernelspec written to a temporary JUPYTER_PATH, so the user's
Jupyter set-up is neither used nor touched)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import FAST_POINTING_BUILD, compose_train
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A `python3` kernelspec running sys.executable; Jupyter and IPython state kept under tmp_path."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "affordvla test kernel", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("AFFORDVLA_ROOT", raising=False)
    return monkeypatch


def _execute(path: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError (with the traceback) if a cell fails
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            assert output.output_type != "error", (path.name, cell.source, output)
    return notebook


def _text(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif "data" in output and "text/plain" in output.data:
            parts.append(output.data["text/plain"])
    return "\n".join(parts)


def _tagged(notebook, tag: str):
    (cell,) = [c for c in notebook.cells if tag in c.get("metadata", {}).get("tags", [])]
    return cell


def _images(cell) -> int:
    return sum("image/png" in output.get("data", {}) for output in cell.get("outputs", []))


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["compare_backbones.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_on_two_backbones(path, tmp_path, smoke_overrides, kernel_env):
    from affordvla.train import train

    train(compose_train(smoke_overrides, tmp_path / "paligemma"))
    # the tiny LLaVA answers in its own format (RoboPoint tuples, five per KALIE answer); the head sizes the budget
    llava = [f"paths.root_dir={tmp_path}", "backbone=llava_tiny", "backbone.build.image_size=32",
             "backbone.build.patch_size=8", "backbone.build.hidden_size=32", "backbone.build.vision_layers=2",
             "backbone.build.text_layers=2", *FAST_POINTING_BUILD, "debug=smoke", "dataset.generate.image_size=64",
             "callbacks.progress_bar.refresh_rate=0"]
    train(compose_train(llava, tmp_path / "llava"))
    kernel_env.setenv("AFFORDVLA_MLFLOW_URI", f"sqlite:///{tmp_path}/outputs/mlflow.db")
    notebook = _execute(path)
    if path.name == "compare_backbones.ipynb":
        table = _text(_tagged(notebook, "backbone_table"))
        assert "paligemma_tiny" in table and "llava_tiny" in table and "vs_baseline" in table
        assert _images(_tagged(notebook, "backbone_chart")) == 1
        overlays = _tagged(notebook, "overlays")
        assert _images(overlays) == 2
        assert "test_step000004.png" in _text(overlays)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_on_an_empty_store(path, tmp_path, kernel_env):
    kernel_env.setenv("AFFORDVLA_MLFLOW_URI", f"sqlite:///{tmp_path}/empty/mlflow.db")
    notebook = _execute(path)
    text = "\n".join(_text(c) for c in notebook.cells if c.cell_type == "code")
    assert "No finished keypoint training runs in this store yet" in text
    assert not (tmp_path / "empty").exists()  # reading never creates a store
