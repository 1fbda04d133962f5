#!/usr/bin/env bash
# GPU check (issue 20): one prepared command for a short GPU window. Makes the environment usable (megatron_dil from
# this checkout via PYTHONPATH, nothing to build; missing Python packages installed at the versions CI pins, never
# touching torch), then runs bench/gpu_check.py within the remaining time: one table on stdout, OUT/gpu_check.json,
# OUT/rowN.log, OUT/install.log. See bench/gpu_check.py for what each row checks.
#
#   bash bench/gpu_check.sh [--output OUT] [--budget SECONDS] [--wheels DIR] [--dry-run] [gpu_check.py options]
#   bash bench/gpu_check.sh --download-wheels DIR [--python-version 3.12]    # on a machine with PyPI access
#
# --budget     total seconds including installs (default 480: inside an 8-minute window, leaving time to copy back)
# --wheels     install missing packages only from DIR (pip --no-index), for machines without network
# --download-wheels  fetch the wheels a bare CUDA PyTorch image lacks (megatron-core) into DIR, for --wheels
# --dry-run    CPU only at tiny sizes (CUDA hidden): every step that needs no GPU
# PYTHON       interpreter to use (default: python3, else python)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
OUTPUT="$ROOT/bench/results/gpu_check"
BUDGET=480
WHEELS=""
DOWNLOAD=""
PYVER=3.12
PASS_ARGS=()
start=$SECONDS

need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "gpu_check.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --output) need_value "$@"; OUTPUT=$2; shift 2 ;;
    --budget) need_value "$@"; BUDGET=$2; shift 2 ;;
    --wheels) need_value "$@"; WHEELS=$2; shift 2 ;;
    --download-wheels) need_value "$@"; DOWNLOAD=$2; shift 2 ;;
    --python-version) need_value "$@"; PYVER=$2; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exec "$PYTHON" "$ROOT/bench/gpu_check.py" --help ;;
    *) PASS_ARGS+=("$1"); shift ;;
  esac
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2; }

# Packages the check imports, with the versions CI pins (scripts/constraints.txt); torch is never installed.
MODULES="megatron.core:megatron-core transformers:transformers safetensors:safetensors tokenizers:tokenizers
yaml:PyYAML tqdm:tqdm einops:einops psutil:psutil numpy:numpy"
pinned() { local v; v=$(grep -i "^$1==" "$ROOT/scripts/constraints.txt" | head -1); echo "${v:-$1}"; }

if [[ -n "$DOWNLOAD" ]]; then
  mkdir -p "$DOWNLOAD"
  exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DOWNLOAD" "$(pinned megatron-core)"
fi

mkdir -p "$OUTPUT" || { echo "gpu_check.sh: cannot create --output $OUTPUT" >&2; exit 2; }
LOG="$OUTPUT/install.log"
: >"$LOG"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
echo "python: $PYTHON ($("$PYTHON" --version 2>&1))" | tee -a "$LOG"

missing=()
for entry in $MODULES; do
  module=${entry%%:*} dist=${entry#*:}
  "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" 2>/dev/null \
    || missing+=("$(pinned "$dist")")
done
mcore=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('megatron-core'))" 2>/dev/null || true)
if [[ -n "$mcore" && "$mcore" != 0.16.* ]]; then
  echo "warning: megatron-core $mcore is installed; megatron_dil is tested against 0.16.x (left as it is)" | tee -a "$LOG"
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  torch_version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null || true)
  pin=$(mktemp)
  [[ -n "$torch_version" ]] && echo "torch==$torch_version" >"$pin"  # pip may not replace the image's torch
  source_args=(--retries 0 --timeout 15)
  [[ -n "$WHEELS" ]] && source_args=(--no-index --find-links "$WHEELS")
  echo "installing: ${missing[*]} (torch kept at ${torch_version:-none})" | tee -a "$LOG"
  timeout 240 "$PYTHON" -m pip install --disable-pip-version-check --no-cache-dir "${source_args[@]}" -c "$pin" \
    "${missing[@]}" >>"$LOG" 2>&1 \
    && echo "installed in $((SECONDS - start)) s" | tee -a "$LOG" \
    || echo "install FAILED after $((SECONDS - start)) s (rows that need these packages will say so): tail of $LOG:" \
       "$(tail -n 3 "$LOG")" | tee -a "$LOG"
  rm -f "$pin"
else
  echo "nothing to install" | tee -a "$LOG"
fi

remaining=$((BUDGET - (SECONDS - start)))
exec "$PYTHON" "$ROOT/bench/gpu_check.py" --output "$OUTPUT" --budget "$remaining" --install-log "$LOG" \
  "${PASS_ARGS[@]}"
