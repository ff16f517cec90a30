#!/usr/bin/env bash
# Builds lora_fused on this machine (no GPU needed) for the device machine: a wheel for sm_90a
# against the device's torch, in .prebuilt/, which `scripts/gpu_check.sh --prebuilt` installs instead
# of building there (the build takes about 230 s of a GPU call). _C uses only CPython's stable ABI,
# so a build under this machine's Python serves the device's.
#
#   scripts/build_prebuilt.sh        TORCH_VERSION (default 2.11.0, the device's), MAX_JOBS (default 2)
#
# It builds a copy of the working tree (tracked and untracked, not ignored files) in a folder kept
# between runs, so an edit recompiles only what it touches (from scratch: 684 s on 2 cores), and
# writes .prebuilt/sources.sha256, the hash gpu_check.sh --prebuilt compares with the tree it runs in.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.11.0}
VENV=${PREBUILT_VENV:-/tmp/lf-prebuilt-venv-$TORCH_VERSION}
SRC=${PREBUILT_SRC:-/tmp/lf-prebuilt-src-$TORCH_VERSION}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" ninja numpy setuptools wheel "nvidia-cutlass==4.2.0.0"
fi
mkdir -p "$SRC"
# Files as the device's copy has them; only those whose content differs are copied, so a branch
# switch here does not make the build folder recompile what did not change.
git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do
  if [ -f "$f" ] && ! cmp -s "$f" "$SRC/$f"; then
    mkdir -p "$SRC/$(dirname "$f")" && cp "$f" "$SRC/$f"
    # setuptools skips an extension whose sources are older than it, whatever setup.py's flags say.
    if [ "$f" = setup.py ]; then rm -rf "$SRC/build"; fi
  fi
done
# and none that the tree no longer has (setup.py compiles every csrc/**/*.cu it finds).
comm -13 <(git ls-files -co --exclude-standard | sort) <(cd "$SRC" && find csrc lora_fused -type f -not -path "*/__pycache__/*" | sort) \
  | (cd "$SRC" && xargs -r rm -f)
scripts/sources_hash.sh > "$SRC/.sources.sha256"
rm -rf .prebuilt && mkdir -p .prebuilt
start=$(date +%s)
if ! (cd "$SRC" && CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=${MAX_JOBS:-2} \
      "$VENV/bin/python" -m pip wheel --no-build-isolation --no-deps --no-index -w "$OLDPWD/.prebuilt" .) > .prebuilt/build.log 2>&1; then
  tail -40 .prebuilt/build.log; echo "build_prebuilt.sh: BUILD FAILED (log: .prebuilt/build.log)"; exit 1
fi
cp "$SRC/.sources.sha256" .prebuilt/sources.sha256
echo "build_prebuilt.sh: $(ls .prebuilt/*.whl) for torch $TORCH_VERSION, sm_90a, in $(( $(date +%s) - start )) s"
