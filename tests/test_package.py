"""The package as users install it: a regular (non-editable) wheel with mlx_flash.convert inside."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tiny_models import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_install_runs_the_converter(tmp_path):
    wheels = tmp_path / "wheels"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("mlx_lm_flash-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mlx_flash/convert/__main__.py" in names and "mlx_flash/generate.py" in names
    assert not any(n.startswith(("convert/", "tests/")) for n in names)

    site = tmp_path / "site"
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
        ],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr
    src, _ = save_tiny_model("llama", tmp_path / "src")
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run(
        [sys.executable, "-c", "import mlx_flash, sys; print(mlx_flash.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert run.stdout.strip().startswith(str(site))
    convert = subprocess.run(
        [sys.executable, "-m", "mlx_flash.convert", str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert convert.returncode == 0, convert.stderr
    assert (tmp_path / "out" / "flash_manifest.json").is_file()
