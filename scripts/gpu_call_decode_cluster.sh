#!/usr/bin/env bash
# One device call for the in-kernel LoRA shrink (LORA_FUSED_NF4_GEMV_CLUSTER, session 37) and the late u
# (LORA_FUSED_NF4_GEMV_LATE_U, session 38), neither yet GPU-run: install .prebuilt's wheel (scripts/build_prebuilt.sh; carry ".prebuilt" and ".whl"), run
# their tests first under a short timeout (a hang costs 2 minutes, not the call), then the QLoRA decode
# bench with their columns, then all of tests/test_nf4_linear.py in the time left. Logs under $OUT.
#
#   scripts/gpu_call_decode_cluster.sh        (about 8 minutes on an H100)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
scripts/gpu_check.sh --prebuilt --no-tests --no-bench > $OUT/install.log 2>&1; echo "install rc $?"; tail -5 $OUT/install.log
OUT=$OUT/cl LORA_FUSED_TESTS="tests/test_nf4_linear.py::test_decode_lora_shrink_inside_the_kernel tests/test_nf4_linear.py::test_decode_late_u_is_bitwise_the_default" LORA_FUSED_XDIST=15 LORA_FUSED_TEST_TIMEOUT=120 scripts/gpu_check.sh --no-build --no-bench --cuda-cases > /dev/null 2>&1; echo "cluster tests rc $?"
tail -15 $OUT/cl/pytest.log
(rm -rf /tmp/b && cp -r scripts /tmp/b && cd /tmp/b
PYTHONPATH=/tmp/lf-site timeout 150 python bench_qlora_decode.py --r 16 --M 1,16 --shapes 4096:4096,4096:11008,8192:28672 \
  --columns "qlora,nf4,u ready,qlora cluster 1,qlora cluster 2,qlora cluster 4,qlora cluster 8,qlora late u" 2>&1 | tee $OUT/bench_qlora_decode_r16_cluster.txt
PYTHONPATH=/tmp/lf-site timeout 90 python bench_qlora_decode.py --r 64 --M 16 --shapes 4096:4096,4096:11008 \
  --columns "qlora,nf4,u ready,qlora cluster 4,qlora cluster 8,qlora late u" 2>&1 | tee $OUT/bench_qlora_decode_r64_cluster.txt)
# All of test_nf4_linear.py in what is left of the call's 600 s (pytest prints its summary when stopped).
LEFT=$(( 540 - SECONDS ))
OUT=$OUT/nf4 LORA_FUSED_TESTS="tests/test_nf4_linear.py" LORA_FUSED_XDIST=15 LORA_FUSED_TEST_TIMEOUT=$LEFT scripts/gpu_check.sh --no-build --no-bench --cuda-cases > /dev/null 2>&1; echo "nf4 tests rc $? (limit $LEFT s)"
tail -8 $OUT/nf4/pytest.log
