"""Offline pipeline of mlx_flash: turn a model into a flash model directory.

Installed as ``mlx_flash.convert`` (see pyproject's package-dir), so ``python -m mlx_flash.convert``
works after ``pip install``.
"""
