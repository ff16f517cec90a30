#!/usr/bin/env bash
# Where the NF4 GEMM with a decoding warpgroup stalls: builds it with the probe's entry, runs ncu_stalls.py under
# Nsight Compute (clocks left alone) and writes the warp-state summary, the per-SASS-instruction stall
# samples and their summary (ncu_summary.py) to $OUT. Needs the nvidia_cutlass wheel in .whl/ (headers) and ncu on the PATH or in /opt/nvidia.
#
#     OUT=/tmp/out scripts/probe_nf4_ss_gemm/ncu_stalls.sh [M K N MODE [TRANS]]
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lf-site .whl/nvidia_cutlass*.whl
S=/tmp/lf-site/cutlass_library/source
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a -Icsrc -I$S/include -DNDEBUG -lineinfo \
  ${NVCC_EXTRA:-} -Xcompiler -fPIC -shared csrc/cuda/sm90/nf4_ss_gemm.cu scripts/probe_nf4_ss_gemm/entry.cu -o /tmp/nf4_ss_gemm.so \
  > "$OUT/ncu_build.log" 2>&1 || { tail -30 "$OUT/ncu_build.log"; exit 1; }
args=${*:-4096 4096 11008 0}
tag=$(echo $args | tr ' ' _)
timeout 300 "$NCU" --clock-control none --kernel-name regex:nf4_ss_gemm --launch-skip 2 --launch-count 1 \
  --section WarpStateStats --section SourceCounters --section SpeedOfLight --section SchedulerStats \
  --import-source yes --export /tmp/ss_$tag -f python3 scripts/probe_nf4_ss_gemm/ncu_stalls.py /tmp/nf4_ss_gemm.so $args \
  > "$OUT/ncu_$tag.log" 2>&1
"$NCU" --import /tmp/ss_$tag.ncu-rep --print-details all > "$OUT/ncu_${tag}_details.txt" 2>&1
"$NCU" --import /tmp/ss_$tag.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_${tag}_sass.csv" 2>&1
cp /tmp/ss_$tag.ncu-rep "$OUT/" 2>/dev/null
tail -5 "$OUT/ncu_$tag.log"; wc -c "$OUT"/ncu_${tag}_*
python3 scripts/probe_nf4_ss_gemm/ncu_summary.py "$OUT/ncu_${tag}_sass.csv" > "$OUT/ncu_${tag}_summary.txt" 2>&1 && head -25 "$OUT/ncu_${tag}_summary.txt"
