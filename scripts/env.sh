# Create (once) and activate the project's virtual environment: CPU torch pinned first, so that
# nothing pulls a multi-GB CUDA build; a torch already in the venv (e.g. a user's CUDA build) is kept.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AMORTIZE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "torch==${AMORTIZE_TORCH_VERSION:-2.13.0}"
fi
EXTRAS="${AMORTIZE_EXTRAS:-test}"  # scripts/test.sh adds bench: the NumPyro twins' tests then run
stamp="$VENV/.amortize-installed-${EXTRAS//,/-}"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
