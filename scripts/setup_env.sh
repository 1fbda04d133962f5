#!/usr/bin/env bash
# Create (or reuse) the project virtual environment .venv and install megatron_dil with its test extra.
#
#   bash scripts/setup_env.sh            # idempotent: a consistent .venv is reused as is
#
# Order matters: torch is installed FIRST at the pinned CPU version, so pip never resolves an unpinned torch (that
# would pull gigabytes of CUDA wheels); then `pip install -e .[test]` with scripts/constraints.txt pins the rest.
# Environment knobs:
#   PYTHON           interpreter to build the venv from (default: python3.11, else python3; needs >= 3.10)
#   VENV             venv directory (default: .venv in the repository root)
#   TORCH_SPEC       torch requirement (default: torch==2.13.0)
#   TORCH_INDEX_URL  extra index for torch, e.g. https://download.pytorch.org/whl/cpu on machines whose pip has no
#                    local CPU wheel (plain PyPI serves the CUDA build for Linux x86-64)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
if [[ -z "${PYTHON:-}" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi

"$PYTHON" - <<'PY' || { echo "setup_env: $PYTHON must be Python >= 3.10 (megatron-core 0.16.1)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

PIP_FLAGS=(--disable-pip-version-check)
[[ "${CI:-}" == "true" ]] && PIP_FLAGS+=(--progress-bar off)

# The stamp records what the venv was built from; a venv is reused only when its interpreter runs, the stamp
# matches, and the package imports.
stamp_of() {
    {
        "$PYTHON" -c 'import sys; print(sys.version_info[:2])'
        echo "$TORCH_SPEC"
        cat setup.py scripts/constraints.txt
    } | sha256sum | cut -d' ' -f1
}
STAMP_FILE="$VENV/.megatron_dil_stamp"
WANT="$(stamp_of)"

if [[ -x "$VENV/bin/python" ]] && [[ -f "$STAMP_FILE" ]] && [[ "$(cat "$STAMP_FILE")" == "$WANT" ]] \
        && "$VENV/bin/python" -c 'import torch, megatron.core, megatron_dil' >/dev/null 2>&1; then
    echo "setup_env: reusing $VENV (up to date)"
    exit 0
fi

if [[ -e "$VENV" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    echo "setup_env: $VENV exists but its interpreter does not run; remove it and re-run" >&2
    exit 1
fi
if [[ ! -e "$VENV" ]]; then
    echo "setup_env: creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

echo "setup_env: installing $TORCH_SPEC"
TORCH_INDEX_ARGS=()
[[ -n "$TORCH_INDEX_URL" ]] && TORCH_INDEX_ARGS=(--extra-index-url "$TORCH_INDEX_URL")
"$PY" -m pip install "${PIP_FLAGS[@]}" "${TORCH_INDEX_ARGS[@]}" "$TORCH_SPEC" </dev/null

echo "setup_env: installing megatron_dil[test] (editable, pinned by scripts/constraints.txt)"
"$PY" -m pip install "${PIP_FLAGS[@]}" -c scripts/constraints.txt -e ".[test]" </dev/null

"$PY" - "$TORCH_SPEC" <<'PY'
import sys

from megatron_dil.runtime.cpu_compat import silence_expected_warnings

silence_expected_warnings()  # Megatron-Core's import-time notices about Transformer Engine/apex on CPU

import megatron.core  # noqa: E402
import torch  # noqa: E402

import megatron_dil  # noqa: E402

spec = sys.argv[1]
if "==" in spec and torch.__version__.split("+")[0] != spec.split("==")[1]:
    sys.exit(f"setup_env: torch {torch.__version__} was installed but {spec} was asked for")
print(f"setup_env: python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core "
      f"{megatron.core.__version__}, megatron_dil {megatron_dil.__version__}, cuda available: "
      f"{torch.cuda.is_available()}")
PY
echo "$WANT" > "$STAMP_FILE"
