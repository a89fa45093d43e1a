"""Every code block of README.md and docs/*.md runs as written, with short training.

``python`` blocks run in one namespace per file; ``bash`` blocks and the ``$ `` commands of ``console``
blocks run in bash with ``amortize`` on the path (the variables a block sets carry to the next one); all
in document order, in a temporary folder where ``experiments/`` is the repository's. A console command
whose shown output starts with ``amortize: error`` must exit 2; every other command must succeed. A block
preceded by ``<!-- no-run -->`` is skipped (installs, servers, names the text leaves to the reader).

The numbers that set how long things run are shortened (``steps=3000`` -> ``steps=4``, NUTS to 30
iterations, ``--datasets`` to 3): the commands are the documented ones, only shorter.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_RUN = "<!-- no-run -->"
SHORTER = [  # (pattern, replacement): training steps, NUTS iterations, dataset counts
    (re.compile(r"\b((?:train\.)?(?:refine_)?steps)=(\d+)"), lambda m: f"{m.group(1)}={min(int(m.group(2)), 4)}"),
    (re.compile(r"\bbatch_size=(\d+)"), lambda m: f"batch_size={min(int(m.group(1)), 8)}"),
    (re.compile(r"\b(nuts\.num_(?:warmup|samples))=(\d+)"), lambda m: f"{m.group(1)}={min(int(m.group(2)), 30)}"),
    (re.compile(r"--datasets (\d+)"), lambda m: f"--datasets {min(int(m.group(1)), 3)}"),
]
PYTHON = sys.executable
CLI = "import sys; from amortize.cli import main; sys.exit(main(sys.argv[1:]))"
PREAMBLE = f"""set -e
amortize() {{ {shlex.quote(PYTHON)} -c {shlex.quote(CLI)} "$@"; }}
"""


@dataclass
class Block:
    lang: str  # python | bash | console
    text: str
    line: int  # of the opening fence, 1-based


def blocks(path: Path) -> list[Block]:
    """The runnable fenced blocks of ``path`` in order (python, bash, console), those marked no-run left out."""
    out, lines, i, previous = [], path.read_text().splitlines(), 0, ""
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            previous = lines[i].strip() or previous
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if fence.group(1) in ("python", "bash", "console") and previous != NO_RUN:
            out.append(Block(fence.group(1), "\n".join(body), start + 1))
        previous = ""
    return out


def shorter(text: str) -> str:
    for pattern, repl in SHORTER:
        text = pattern.sub(repl, text)
    return text


def console_script(text: str) -> str:
    """The ``$ `` commands of a console block as bash: each checked for the exit code its output shows."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            i += 1
            continue
        cmd = lines[i][2:]
        while cmd.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            cmd = cmd.rstrip()[:-1].rstrip() + " " + lines[i].strip()
        i += 1
        shown = lines[i] if i < len(lines) else ""
        output = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        quoted = shlex.quote(cmd)
        if any(line.startswith("FAILED") for line in output):  # a check shown failing (sbc exits 1)
            out.append(f"set +e; {cmd}; rc=$?; set -e; [ $rc -le 1 ] || {{ echo 'exit '$rc':' {quoted} >&2; exit 1; }}")
        elif shown.startswith("amortize: error"):
            out.append(
                f"set +e; {cmd}; rc=$?; set -e; [ $rc -eq 2 ] || {{ echo 'exit '$rc' != 2:' {quoted} >&2; exit 1; }}"
            )
        else:
            out.append(f"{cmd} || {{ echo 'failed:' {quoted} >&2; exit 1; }}")
    return "\n".join(out)


def run_shell(script: str, cwd: Path, state: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    names = sorted(set(re.findall(r"^\s*([A-Z_][A-Z0-9_]*)=", script, re.M)))
    save = f"\ndeclare -p {' '.join(names)} >> {shlex.quote(str(state))}" if names else ""
    full = f"{PREAMBLE}[ -f {shlex.quote(str(state))} ] && source {shlex.quote(str(state))}\n{script}{save}\n"
    return subprocess.run(["bash", "-c", full], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def run_file(path: Path, tmp: Path, langs: tuple[str, ...] = ("python", "bash", "console")) -> None:
    (tmp / "experiments").symlink_to(ROOT / "experiments")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "CI": "1"}
    env["MPLBACKEND"] = "Agg"
    namespace: dict = {"__name__": "__docs__"}
    here = os.getcwd()
    os.chdir(tmp)
    try:
        for b in (b for b in blocks(path) if b.lang in langs):
            where = f"{path.name}:{b.line}"
            text = shorter(b.text)
            if b.lang == "python":
                try:
                    exec(compile(text, where, "exec"), namespace)
                except Exception as e:  # noqa: BLE001 - name the block
                    raise AssertionError(f"{where}: {type(e).__name__}: {e}") from e
            else:
                script = console_script(text) if b.lang == "console" else text
                res = run_shell(script, tmp, tmp / ".state", env)
                assert res.returncode == 0, (
                    f"{where}:\n{script}\n--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}"
                )
    finally:
        os.chdir(here)


def test_blocks_are_found_and_no_run_is_honoured(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("```python\na = 1\n```\n\n<!-- no-run -->\n```bash\nexit 1\n```\n```yaml\nk: v\n```\n")
    assert [(b.lang, b.text) for b in blocks(doc)] == [("python", "a = 1")]
    assert shorter("fit(steps=3000, refine_steps=2000) train.steps=500 --datasets 10") == (
        "fit(steps=4, refine_steps=4) train.steps=4 --datasets 3"
    )
    script = console_script("$ amortize x \\\n    --y 1\nok\n$ amortize bad\namortize: error: no\n")
    assert "amortize x --y 1 ||" in script and "[ $rc -eq 2 ]" in script


def test_readme_python_tour_runs(tmp_path):
    """The README's Python blocks alone (about 15 s): the tour from the shipped CSV to InferenceData."""
    pytest.importorskip("arviz")
    run_file(ROOT / "README.md", tmp_path, langs=("python",))


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_documented_code_runs(path, tmp_path):
    """Every block of every file, commands included (a few minutes: each command starts Python)."""
    pytest.importorskip("arviz")
    if not blocks(path):
        pytest.skip(f"{path.name}: no runnable block")
    run_file(path, tmp_path)
