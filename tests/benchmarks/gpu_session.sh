#!/usr/bin/env bash
# Issue 5's measurements on the lent H100, in the calls the device tool allows (DEVELOPERS.md).
#
#   tests/benchmarks/gpu_session.sh pack     here, after `make repro`: wheels + artifacts into .devpack/NN
#   (then one device call per part, back to back:  mkdir -p /tmp/devpack && cp .devpack/NN/part_* /tmp/devpack/)
#   tests/benchmarks/gpu_session.sh run      on the GPU machine, in the last call (carry .devpack/SHA256):
#                                            unpack, install into /tmp/site, then verify, gpu_bench and the
#                                            GPU tests, everything written under $OUT
#
# The GPU machine has torch, sentence-transformers, onnx and a CPU-only onnxruntime but no network;
# `pack` brings onnxruntime-gpu, onnxconverter-common and pytest (cp312 wheels), the bundle and the
# reference model. Import torch before onnxruntime there (gpu_bench and conftest do).
set -euo pipefail
cd "$(dirname "$0")/../.."

pack() {
  local wheels=/tmp/gpu-wheels
  rm -rf "$wheels" && mkdir -p "$wheels"
  local get=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
             --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$wheels")
  "${get[@]}" onnxruntime-gpu==1.31.1 onnxconverter-common pytest pluggy iniconfig  # 1.31.1: CUDA 13 there
  grep -qx '/.devpack/' .git/info/exclude || echo '/.devpack/' >> .git/info/exclude
  mkdir -p .devpack  # a folder pattern: git only sees it ignored once the folder exists
  ../shared/tools/device-pack .devpack "$wheels" artifacts/minilm_l6/bundle artifacts/minilm_l6/source/model
}

run() {
  : "${OUT:?run this on the device machine, where OUT is set}"
  local sum
  sum=$(cat .devpack/SHA256)
  cat /tmp/devpack/part_* > /tmp/pack.tar
  echo "$sum  /tmp/pack.tar" | sha256sum -c -
  mkdir -p /tmp/unpacked && tar xf /tmp/pack.tar -C /tmp/unpacked
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/unpacked/tmp/gpu-wheels/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  mkdir -p artifacts/minilm_l6 "$OUT/results"
  cp -r /tmp/unpacked/artifacts/minilm_l6/bundle /tmp/unpacked/artifacts/minilm_l6/source artifacts/minilm_l6/
  { nvidia-smi || true; python3 -c "import torch, onnxruntime as o; print(torch.__version__, o.__version__, o.get_available_providers())"
  } > "$OUT/env.txt" 2>&1
  python3 -c "import torch, sys; from sbert_bundle.cli import main; sys.exit(main(['inspect', 'artifacts/minilm_l6/bundle']))" \
    > "$OUT/inspect.txt" 2>&1 || true  # torch first: onnxruntime-gpu finds the CUDA libraries it loaded
  python3 -m stages.verify > "$OUT/verify.txt" 2>&1 || echo "verify failed (see verify.txt)"
  cp -r artifacts/minilm_l6/verify "$OUT/" 2>/dev/null || true
  python3 tests/benchmarks/gpu_bench.py --transformer artifacts/minilm_l6/source/model --out "$OUT/results" \
    > "$OUT/gpu_bench.txt" 2>&1 || echo "gpu_bench failed (see gpu_bench.txt)"
  python3 -m pytest -p no:cacheprovider -m "gpu or tensorrt" -rs tests/test_gpu.py tests/test_build_trt.py \
    > "$OUT/pytest.txt" 2>&1 || echo "GPU tests failed (see pytest.txt)"
  tail -n 30 "$OUT/verify.txt" "$OUT/gpu_bench.txt" "$OUT/pytest.txt"
}

case "${1:-}" in
  pack) pack ;;
  run) run ;;
  *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
