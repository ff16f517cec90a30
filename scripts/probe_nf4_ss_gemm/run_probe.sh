#!/usr/bin/env bash
# Probe of the NF4 GEMM with a decoding warpgroup (csrc/cuda/sm90/nf4_ss_gemm.cu; probe.py) on the GPU machine, after
# scripts/gpu_check.sh installed lora_fused (probe.py compares with its CUTLASS NF4 GEMM and cuBLAS):
#
#     OUT=/tmp/out scripts/probe_nf4_ss_gemm/run_probe.sh [probe.py arguments]
# (PROBE_TIMEOUT, default 300 s, bounds the Python run: a pipeline bug would otherwise hang the GPU.)
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lf-site .whl/nvidia_cutlass*.whl
export PYTHONPATH=/tmp/lf-site${PYTHONPATH:+:$PYTHONPATH}
S=/tmp/lf-site/cutlass_library/source
start=$(date +%s)
nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -Icsrc -I$S/include -DNDEBUG \
  -Xcompiler -fPIC -shared csrc/cuda/sm90/nf4_ss_gemm.cu scripts/probe_nf4_ss_gemm/entry.cu -o /tmp/nf4_ss_gemm.so > "$OUT/nf4_ss_build.log" 2>&1 \
  || { tail -30 "$OUT/nf4_ss_build.log"; exit 1; }
echo "compiled in $(( $(date +%s) - start )) s"
(cd /tmp && timeout ${PROBE_TIMEOUT:-300} python3 "$OLDPWD/scripts/probe_nf4_ss_gemm/probe.py" /tmp/nf4_ss_gemm.so "$@") 2>&1 | tee "$OUT/probe_nf4_ss_gemm.txt"
