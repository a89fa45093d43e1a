"""The helpers the commands' files are written with: JSON-safe values, atomic JSON, folders made and removed
again (amortize.files), and the names a validation is filed under (amortize.validate.commands)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from amortize.errors import ConfigError
from amortize.files import json_safe, make_dirs, remove_empty, write_json
from amortize.validate.commands import validation_name
from amortize.validate.results import json_safe as results_json_safe


def test_json_safe_turns_tensors_arrays_and_non_finite_numbers_into_json() -> None:
    value = {1: torch.tensor([0.5, float("nan")]), "a": (np.float32(2.0), np.int64(3), np.array([math.inf]))}
    assert json_safe(value) == {"1": [0.5, None], "a": [2.0, 3, [None]]}
    assert results_json_safe is json_safe  # one mechanism, re-exported where the bench scripts import it


def test_write_json_is_strict_json_and_names_its_path(tmp_path: Path) -> None:
    out = write_json(tmp_path / "a" / "r.json", {"k": float("nan"), "z": torch.zeros(2)})
    assert out == tmp_path / "a" / "r.json"
    assert json.loads(out.read_text()) == {"k": None, "z": [0.0, 0.0]}
    assert not [p for p in out.parent.iterdir() if p.name != "r.json"]  # no temporary file left


def test_make_dirs_says_what_it_made_and_remove_empty_keeps_what_holds_files(tmp_path: Path) -> None:
    made = make_dirs(tmp_path / "x" / "y" / "z", exist_ok=True)
    assert made == [tmp_path / "x", tmp_path / "x" / "y", tmp_path / "x" / "y" / "z"]
    assert make_dirs(tmp_path / "x" / "y", exist_ok=True) == []
    with pytest.raises(FileExistsError):
        make_dirs(tmp_path / "x", exist_ok=False)
    (tmp_path / "x" / "keep.txt").write_text("mine")
    remove_empty(made)
    assert not (tmp_path / "x" / "y").exists() and (tmp_path / "x" / "keep.txt").is_file()


@pytest.mark.parametrize(
    "name, data, expect",
    [(None, None, "heldout"), (None, "dir/My data (v2).csv", "My_data_v2"), ("run-1.b", "x.csv", "run-1.b")],
)
def test_validation_name(name: str | None, data: str | None, expect: str) -> None:
    assert validation_name(name, data) == expect


def test_validation_name_refuses_what_cannot_name_files_and_tags() -> None:
    with pytest.raises(ConfigError, match="--name 'a/b'"):
        validation_name("a/b", None)
