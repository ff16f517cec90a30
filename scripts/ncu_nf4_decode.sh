#!/usr/bin/env bash
# Nsight Compute on nf4_linear's decode kernel at 1 and 16 tokens, with the installed lora_fused (run
# scripts/gpu_check.sh first in the same call): speed of light, the L1/shared pipes' wavefronts,
# scheduler and warp-state statistics with the stall reasons, one text report per variant in $OUT. A variant is LABEL or
# LABEL:VAR=VALUE[,VAR=VALUE...] (environment for that run; LABEL alone runs the default).
#
#     OUT=/tmp/out scripts/ncu_nf4_decode.sh [--shape 8192:28672] [--sass] default rows16:LORA_FUSED_NF4_GEMV_ROWS=16
#
# NCU_TARGETS picks other ncu_targets.py targets (default "nf4_decode_m1 nf4_decode_m16"; e.g.
# "nf4_decode_m16 qlora_decode_m16" to see both kernels' shared-memory configurations), NCU_KERNELS
# the kernels profiled (default regex:nf4_gemv; e.g. "regex:lora_decode|gemv|gemm" with the targets
# "lora_decode_m1 cublas_m1" for lora_decode's kernels beside cuBLAS's).
# --sass: also each target's per-SASS-instruction stall samples (the source page, one report a target)
# and their summary (probe_nf4_ss_gemm/ncu_summary.py), to see which instructions the warps wait at.
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SHAPE=8192:28672
SASS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --shape) SHAPE=$2; shift 2 ;;
    --sass) SASS=1; shift ;;
    *) break ;;
  esac
done
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu_nf4_decode.sh: no ncu on this machine"; exit 1; }
for variant in "${@:-default}"; do
  label=${variant%%:*}
  envs=(); [ "$variant" != "$label" ] && IFS=, read -ra envs <<< "${variant#*:}"
  rep="$OUT/ncu_nf4_decode_${label}_${SHAPE/:/x}.txt"
  env "${envs[@]}" timeout 240 "$NCU" --clock-control none --profile-from-start off --kernel-name "${NCU_KERNELS:-regex:nf4_gemv}" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --section ComputeWorkloadAnalysis --section SchedulerStats --section WarpStateStats --section LaunchStats \
    --section Occupancy --section SourceCounters --print-details all \
    --metrics "$(echo smsp__average_warps_issue_stalled_{barrier,long_scoreboard,short_scoreboard,mio_throttle,lg_throttle,math_pipe_throttle,wait,not_selected,selected,dispatch_stall,no_instruction,misc,tex_throttle,drain,membar,branch_resolving}_per_issue_active.ratio | tr ' ' ,)" \
    python3 ncu_targets.py --shape "$SHAPE" ${NCU_TARGETS:-nf4_decode_m1 nf4_decode_m16} > "$rep" 2>&1
  echo "== $label (${envs[*]}): $rep"
  grep -E "Context 1, Stream|Duration|DRAM Throughput|L1/TEX Cache Throughput|L1/TEX Hit Rate|Issue Slots Busy|Registers Per|Shared Memory Configuration Size|Dynamic Shared Memory Per Block|Wavefronts|issue_stalled" "$rep" | head -70
done
if [ $SASS = 1 ]; then
  for target in ${NCU_TARGETS:-nf4_decode_m1 nf4_decode_m16}; do
    rep=/tmp/ncu_sass_${target}_${SHAPE/:/x}
    timeout 240 "$NCU" --clock-control none --profile-from-start off --kernel-name regex:nf4_gemv \
      --section WarpStateStats --section SourceCounters --export "$rep" -f \
      python3 ncu_targets.py --shape "$SHAPE" "$target" > "$OUT/ncu_sass_${target}.log" 2>&1
    "$NCU" --import "$rep.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_sass_${target}_${SHAPE/:/x}.csv" 2>&1
    echo "== $target: per-instruction stall samples"
    python3 probe_nf4_ss_gemm/ncu_summary.py "$OUT/ncu_sass_${target}_${SHAPE/:/x}.csv" --top 25 \
      | tee "$OUT/ncu_sass_${target}_${SHAPE/:/x}_summary.txt"
  done
fi
