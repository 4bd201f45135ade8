"""The example notebooks (examples/*.ipynb) run top to bottom on the small test models and draw
their plots.

Each notebook reads its parameters from environment variables (MLX_FLASH_NOTEBOOK_MODEL, _OUT,
_QUICK, ...), so here they run on stories260K / relu2-8m converted into temporary directories, never
touching the network. They execute in a Jupyter kernel of this very interpreter (nbclient), which
inherits the environment (LD_PRELOAD of OpenBLAS included). The notebooks need the ``examples``
extra (matplotlib, nbclient, ipykernel, nbformat): without it they are skipped on a developer
machine and fail on CI (CI=true).
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import sys
from pathlib import Path

import pytest

from conftest import STORIES_GGUF, WIKITEXT

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = ("quickstart", "memory_budget", "windowing_and_sparsity", "flash_probe")
PNG = b"\x89PNG\r\n\x1a\n"
KERNEL = "mlx-flash-test"


def _need(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{module} is missing: pip install -e '.[examples]'"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def _read(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.ipynb").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_clean_and_parametrized(name):
    """No outputs or execution counts in git; the first code cell is the "parameters" cell and
    reads the env."""
    nb = _read(name)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c.get("outputs") == [] and c.get("execution_count") is None for c in code)
    first = code[0]
    assert "parameters" in first.get("metadata", {}).get("tags", [])
    source = "".join(first["source"])
    for variable in (
        "MLX_FLASH_NOTEBOOK_MODEL",
        "MLX_FLASH_NOTEBOOK_OUT",
        "MLX_FLASH_NOTEBOOK_QUICK",
    ):
        assert variable in source
    assert nb["cells"][0]["cell_type"] == "markdown"  # it starts by saying what the reader will see
    for cell in code:  # plain Python a reader can copy (IPython magics aside)
        lines = "".join(cell["source"]).splitlines()
        ast.parse("\n".join("pass" if line.lstrip().startswith("%") else line for line in lines))


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernelspec that runs ipykernel in this interpreter, whatever ``python`` is on PATH."""
    _need("ipykernel")
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "mlx_flash tests",
                "language": "python",
            }
        )
    )
    return root


def run_notebook(
    name: str, kernel: Path, tmp_path: Path, monkeypatch, **env: str
) -> tuple[dict, Path]:
    """Execute examples/NAME.ipynb in a fresh kernel with the given MLX_FLASH_NOTEBOOK_* settings;
    returns the executed notebook and the folder its PNGs went to. A cell that raises fails the test
    with its traceback."""
    nbformat = _need("nbformat")
    nbclient = _need("nbclient")
    _need("matplotlib")
    figures = tmp_path / "figures"
    monkeypatch.setenv("JUPYTER_PATH", str(kernel))
    monkeypatch.setenv("MLX_FLASH_CACHE", str(tmp_path / "cache"))  # not the user's cache
    monkeypatch.setenv("MLX_FLASH_NOTEBOOK_OUT", str(figures))
    monkeypatch.setenv("MLX_FLASH_NOTEBOOK_QUICK", "1")
    monkeypatch.delenv("MLX_FLASH_SMOLLM2_GGUF", raising=False)  # the default model is not needed
    for key, value in env.items():
        monkeypatch.setenv(f"MLX_FLASH_NOTEBOOK_{key}", value)
    nb = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors, errors
    return nb, figures


def check_pngs(nb, figures: Path, names: list[str]) -> None:
    for name in names:
        data = (figures / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
    shown = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(shown) >= len(names)  # every saved figure is also shown in the notebook


def test_quickstart(kernel, tmp_path, monkeypatch):
    """Convert stories260K (GGUF) into a temporary directory, load it with half the FFN, stream,
    plot telemetry."""
    nb, figures = run_notebook(
        "quickstart",
        kernel,
        tmp_path,
        monkeypatch,
        MODEL=str(STORIES_GGUF),
        WORK=str(tmp_path / "work"),
    )
    check_pngs(nb, figures, ["quickstart_telemetry"])
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "verify: OK" in text and "flash_bytes_per_token" in text
    assert (tmp_path / "work" / "stories260K-float32" / "flash_manifest.json").is_file()


def test_flash_probe(kernel, tmp_path, monkeypatch, relu2_flash, disk_dir):
    """A quick probe grid on the test's disk, and the store reader on relu2-8m."""
    nb, figures = run_notebook(
        "flash_probe",
        kernel,
        tmp_path,
        monkeypatch,
        MODEL=str(relu2_flash),
        PROBE_DIR=str(disk_dir),
    )
    check_pngs(nb, figures, ["flash_probe_throughput", "flash_probe_grid", "flash_probe_reader"])
    # the probe file is gone
    assert not any(p.name.startswith("mlx_flash-probe-") for p in disk_dir.iterdir())


@pytest.mark.slow
def test_memory_budget(kernel, tmp_path, monkeypatch, relu2_calibrated):
    """relu2-8m at shrinking budgets, dense and its trained predictor (slow: about 16 loads and
    generations)."""
    nb, figures = run_notebook(
        "memory_budget", kernel, tmp_path, monkeypatch, MODEL=str(relu2_calibrated)
    )
    check_pngs(nb, figures, ["memory_budget"])


@pytest.mark.slow
def test_windowing_and_sparsity(kernel, tmp_path, monkeypatch, relu2_calibrated):
    """relu2-8m (natural sparsity) on WikiText-2: window sizes, then thresholds and the predictor
    (slow: ~9 evaluations)."""
    nb, figures = run_notebook(
        "windowing_and_sparsity",
        kernel,
        tmp_path,
        monkeypatch,
        MODEL=str(relu2_calibrated),
        DATA=str(WIKITEXT),
    )
    check_pngs(nb, figures, ["windowing", "sparsity"])
