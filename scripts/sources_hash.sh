#!/usr/bin/env bash
# One hash of what a build of lora_fused is made from (csrc/, lora_fused/*.py, setup.py,
# pyproject.toml), run in the source tree: build_prebuilt.sh records it, gpu_check.sh --prebuilt checks it.
set -euo pipefail
cd "$(dirname "$0")/.."
find csrc lora_fused setup.py pyproject.toml -type f \( -name "*.cpp" -o -name "*.cu" -o -name "*.cuh" -o -name "*.h" \
  -o -name "*.py" -o -name "*.toml" \) -not -path "*/__pycache__/*" -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d" " -f1
