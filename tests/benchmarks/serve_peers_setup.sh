#!/usr/bin/env bash
# Peer environments for tests/benchmarks/serve_bench.py (issue 19's benchmark). Idempotent.
#
#   tests/benchmarks/serve_peers_setup.sh            # both venvs + wrk
#   tests/benchmarks/serve_peers_setup.sh st         # only .venv-serve-peers
#   tests/benchmarks/serve_peers_setup.sh infinity   # only .venv-infinity
#
# .venv-serve-peers : torch, sentence-transformers, fastapi, uvicorn   (peer_st_server.py)
# .venv-infinity    : torch, infinity-emb[server,torch]==0.0.78        (infinity_emb v2 --engine torch)
#
# RULE: torch==2.13.0 goes in FIRST in every venv: pip takes the local CPU wheel for it, while
# letting another package pull torch resolves to a multi-GB CUDA build. Every later install
# is constrained to that torch (the constraint file below), so nothing can replace it.
# The load generator is wrk (Debian package), installed with apt-get when missing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python3}"
TORCH="torch==2.13.0"
WHAT="${1:-all}"

pin="$(mktemp)"
trap 'rm -f "$pin"' EXIT
echo "$TORCH" > "$pin"

make_venv() {  # make_venv DIR
    local dir="$1"
    if [ ! -x "$dir/bin/python" ]; then
        "$PY" -m venv "$dir"
    fi
    "$dir/bin/python" -m pip install -q --upgrade pip
    "$dir/bin/python" -m pip install -q "$TORCH"           # first, alone: the local CPU wheel
    "$dir/bin/python" -c "import torch; assert not torch.version.cuda, torch.version.cuda; print('torch', torch.__version__)"
}

if [ "$WHAT" = all ] || [ "$WHAT" = wrk ]; then
    if ! command -v wrk >/dev/null; then
        apt-get update -qq && apt-get install -y -qq wrk
    fi
    wrk --version 2>&1 | head -1 || true
fi

if [ "$WHAT" = all ] || [ "$WHAT" = st ]; then
    V="$REPO/.venv-serve-peers"
    make_venv "$V"
    "$V/bin/python" -m pip install -q -c "$pin" sentence-transformers fastapi uvicorn
    "$V/bin/python" -m pip freeze > "$V/freeze.txt"
    "$V/bin/python" -c "import sentence_transformers, fastapi, uvicorn, torch; print('st', sentence_transformers.__version__, 'fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'torch', torch.__version__)"
fi

if [ "$WHAT" = all ] || [ "$WHAT" = infinity ]; then
    V="$REPO/.venv-infinity"
    make_venv "$V"
    # INFINITY_EXTRA: more packages or pins to try (empty by default). Its optimum engine is not used:
    # with infinity-emb[optimum] (optimum 2.1.0, optimum-onnx 0.1.0) on the bundle folder it fails
    # "Could not find any ONNX files with target file name <absolute path>/onnx/model_int8.onnx" (2026-12-07).
    "$V/bin/python" -m pip install -q -c "$pin" "infinity-emb[server,torch]==0.0.78" ${INFINITY_EXTRA:-}
    "$V/bin/python" -m pip freeze > "$V/freeze.txt"
    "$V/bin/python" -c "import infinity_emb, torch; print('infinity_emb', infinity_emb.__version__, 'torch', torch.__version__)"
fi
