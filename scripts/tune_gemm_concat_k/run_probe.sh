#!/usr/bin/env bash
# Tuning probe (see probe.py): compile configurations of gemm_concat_k as one shared library and time them from Python.
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lf-site .whl/nvidia_cutlass*.whl
S=/tmp/lf-site/cutlass_library/source
FL="-std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -Icsrc -I$S/include -DNDEBUG -Xcompiler -fPIC"
start=$(date +%s)
for f in scripts/tune_gemm_concat_k/v*.cu; do nvcc $FL -c $f -o /tmp/$(basename $f .cu).o > /tmp/$(basename $f).log 2>&1 & done
nvcc $FL -x cu -c scripts/tune_gemm_concat_k/lib.cpp -o /tmp/lib.o
wait
echo "compiled in $(( $(date +%s) - start )) s"; grep -l " error" /tmp/v*.log && cat $(grep -l " error" /tmp/v*.log | head -1) | head -20
nvcc -shared -gencode=arch=compute_90a,code=sm_90a /tmp/v*.o /tmp/lib.o -o /tmp/probe.so && python3 scripts/tune_gemm_concat_k/probe.py /tmp/probe.so 2>&1 | tee $OUT/probe.txt
