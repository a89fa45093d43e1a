"""Result files: JSON-safe values and the results of the ``experiments/bench`` scripts.

:func:`json_safe` (from :mod:`amortize.files`, where the core writes its JSON files) turns tensors,
arrays and numpy scalars into plain lists and numbers (non-finite floats into ``null``), so that
``json.dumps(..., allow_nan=False)`` takes any result. The benchmark
scripts write ``results.json`` and ``results.md`` through :func:`write_results`, headed by
:func:`results_header` and :func:`machine_info`.

Example:
    >>> json_safe({"z": torch.tensor([0.5, float("nan")])})
    {'z': [0.5, None]}
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import atomic_write
from ..files import json_safe
from ..version import __version__

__all__ = ["json_safe", "machine_description", "machine_info", "results_header", "write_results"]


def machine_description(device: str | torch.device | None = None, *, threads: bool = False, extra: str = "") -> str:
    """The machine a benchmark ran on, as its results header names it.

    ``"<arch>, <n> cpus, torch <version>"``, followed by ``extra`` verbatim (e.g. ``" (CPU)"``), then
    ``", <n> thread(s)"`` (torch's CPU threads now) with ``threads``, then ``", device <device>"`` (and
    the GPU's name in parentheses on CUDA) with ``device``.
    """
    text = f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}{extra}"
    if threads:
        text += f", {torch.get_num_threads()} thread(s)"
    if device is not None:
        device = torch.device(device)
        text += f", device {device}"
        if device.type == "cuda":
            text += f" ({torch.cuda.get_device_name(device)})"
    return text


def machine_info(
    device: str | torch.device | None = None, *, threads: bool = False, extra: str = "", with_time: bool = False
) -> dict[str, str]:
    """``{"date": ..., "machine": ..., "version": ...}``: today (``YYYY-MM-DD``, with ``HH:MM`` if
    ``with_time``), :func:`machine_description` (same arguments) and the library version that measured;
    the first keys of a benchmark's results."""
    date = time.strftime("%Y-%m-%d %H:%M" if with_time else "%Y-%m-%d")
    return {"date": date, "machine": machine_description(device, threads=threads, extra=extra), "version": __version__}


def results_header(info: Mapping[str, Any], detail: str | None = None) -> str:
    """The first line of a benchmark's markdown: ``"Measured <date> with amortize <version> on <machine>[;
    <detail>]."`` (no version part where ``info`` has none).

    ``info`` holds ``date``, ``machine`` and ``version`` (:func:`machine_info`, or the results dict that
    starts with it).
    """
    version = f" with amortize {info['version']}" if info.get("version") else ""
    return f"Measured {info['date']}{version} on {info['machine']}" + (f"; {detail}" if detail else "") + "."


def write_results(
    out_dir: str | os.PathLike,
    payload: Mapping[str, Any],
    markdown: str,
    *,
    indent: int = 1,
    default: Callable[[Any], Any] | None = None,
    safe: bool = False,
) -> tuple[Path, Path]:
    """Write ``out_dir/results.json`` (``payload``) and ``out_dir/results.md`` (``markdown`` as given).

    Both are serialized first, then each file is written to a temporary file in ``out_dir`` and
    renamed over the old one (:func:`~amortize.checkpoint.atomic_write`): a reader sees the old file or
    the new one, never half of one, and a payload that cannot be serialized raises before anything
    is written, leaving both files as they were.

    Args:
        out_dir: the results folder (created if missing).
        payload: the JSON results.
        markdown: the markdown text, written verbatim.
        indent: JSON indentation.
        default: ``json.dumps``'s fallback for objects it cannot serialize (e.g. ``str``).
        safe: first convert tensors and arrays to lists and non-finite floats to ``null``.

    Returns:
        The paths of ``results.json`` and ``results.md``.

    Raises:
        TypeError, ValueError: ``payload`` cannot be serialized (nothing written).
        OSError: a write failed (that file and any later one untouched; no temporary file left).
    """
    if safe:
        payload = json_safe(payload)
    blob = json.dumps(payload, indent=indent, default=default).encode()
    text = markdown.encode()
    out = Path(out_dir)
    json_path, md_path = out / "results.json", out / "results.md"
    atomic_write(json_path, lambda fh: fh.write(blob))
    atomic_write(md_path, lambda fh: fh.write(text))
    return json_path, md_path
