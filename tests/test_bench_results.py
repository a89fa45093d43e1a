"""The results writer shared by the scripts in experiments/bench (amortize.validate.results)."""

from __future__ import annotations

import ast
import json
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import amortize as am
from amortize.validate.results import machine_description, machine_info, results_header, write_results

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench"
# numpyro_models: a library of twins, not a script
SCRIPTS = [p for p in sorted(BENCH.glob("*.py")) if p.stem != "numpyro_models"]


def leftovers(folder: Path) -> list[str]:
    """Temporary files of an atomic write left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_results_writes_both_files_and_the_json_round_trips(tmp_path: Path) -> None:
    payload = {"date": "2026-01-02", "machine": "x", "rows": [{"z": 0.5, "ok": True, "index": [1, 2]}], "n": 3}
    markdown = "Measured 2026-01-02 on x.\n\n| a |\n|---:|\n| 1 |"
    json_path, md_path = write_results(tmp_path / "out", payload, markdown)
    assert (json_path, md_path) == (tmp_path / "out" / "results.json", tmp_path / "out" / "results.md")
    assert json.loads(json_path.read_text()) == payload
    assert json_path.read_text() == json.dumps(payload, indent=1)  # the scripts' format, unchanged
    assert md_path.read_text() == markdown  # verbatim: no newline added or removed
    assert leftovers(tmp_path / "out") == []

    write_results(tmp_path / "out", payload, markdown, indent=2)
    assert json_path.read_text() == json.dumps(payload, indent=2)


def test_write_results_options_for_awkward_payloads(tmp_path: Path) -> None:
    payload = {"t": torch.tensor([1.5, 2.0]), "a": np.arange(2), "nan": float("nan"), "k": np.int64(3), 4: (1, 2)}
    write_results(tmp_path, payload, "", safe=True)
    assert json.loads((tmp_path / "results.json").read_text()) == {
        "t": [1.5, 2.0],
        "a": [0, 1],
        "nan": None,
        "k": 3,
        "4": [1, 2],
    }
    write_results(tmp_path, {"path": Path("a/b"), "x": 1}, "", default=str)
    assert json.loads((tmp_path / "results.json").read_text()) == {"path": "a/b", "x": 1}


def test_a_failed_write_leaves_the_previous_results_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_results(tmp_path, {"version": 1}, "first")
    before = {p: (tmp_path / p).read_bytes() for p in ("results.json", "results.md")}

    with pytest.raises(TypeError):  # not serializable: fails before anything is written
        write_results(tmp_path, {"version": 2, "bad": object()}, "second")
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert leftovers(tmp_path) == []

    def no_rename(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", no_rename)  # the rename of the temporary file fails
    with pytest.raises(OSError, match="disk full"):
        write_results(tmp_path, {"version": 3}, "third")
    monkeypatch.undo()
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert json.loads((tmp_path / "results.json").read_text()) == {"version": 1}
    assert leftovers(tmp_path) == []


def test_header_and_machine_keep_the_scripts_format() -> None:
    base = f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}"
    assert machine_description() == base
    assert machine_description(extra=" (CPU)") == base + " (CPU)"
    threads = f", {torch.get_num_threads()} thread(s)"
    assert machine_description("cpu", threads=True) == base + threads + ", device cpu"

    info = machine_info()
    assert list(info) == ["date", "machine", "version"] and info["machine"] == base
    assert info["version"] == am.__version__
    assert time.strptime(info["date"], "%Y-%m-%d")
    assert time.strptime(machine_info(with_time=True)["date"], "%Y-%m-%d %H:%M")

    assert results_header({"date": "2026-01-02", "machine": "m"}) == "Measured 2026-01-02 on m."
    header = results_header({"date": "2026-01-02", "machine": "m", "other": 1}, "checkpoint of 5 steps")
    assert header == "Measured 2026-01-02 on m; checkpoint of 5 steps."
    versioned = results_header({"date": "2026-01-02", "machine": "m", "version": "9.9.9"})
    assert versioned == "Measured 2026-01-02 with amortize 9.9.9 on m."


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_bench_script_uses_the_shared_writer(script: Path) -> None:
    """No script keeps its own header or results writing (README tables are reproduced by these)."""
    text = script.read_text()
    tree = ast.parse(text)
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert {"write_results", "results_header"} <= called
    assert "machine_info" in called
    assert "platform.machine" not in text and "Measured " not in text.split('"""', 2)[2]
    assert 'results.json", lambda' not in text and "results.json', lambda" not in text


def test_every_bench_script_is_listed_in_the_readme() -> None:
    """The README's benchmark table and experiments/bench/ name the same scripts (so the glob above
    checks every script a user is told about, and no script goes undocumented)."""
    readme = (BENCH.parents[1] / "README.md").read_text()
    listed = set(re.findall(r"^\| `([a-z_0-9]+)\.py` \|", readme, flags=re.M))
    assert listed and listed == {p.stem for p in SCRIPTS}
