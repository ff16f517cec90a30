"""Rewrites a wheel in place without the native libraries that the device machine does not load, so
that it fits beside .prebuilt/ in a device call's 64 MiB (the working tree, .prebuilt/ and .whl/
together). bitsandbytes 0.50.2 carries one CUDA library per toolkit (118 ... 132), six ROCm and two
XPU ones: 43 MB; keeping the CPU library and cuda130 (the device's torch is cu130) leaves about 5 MB.

    python scripts/slim_wheel.py .whl/bitsandbytes-0.50.2-*.whl [--keep cuda130]

Every file kept is copied unchanged, so its line in the wheel's RECORD stays valid; the lines of the
files dropped are removed from RECORD.
"""

import argparse
import os
import re
import shutil
import tempfile
import zipfile

# Native libraries by accelerator and toolkit: libNAME_cuda130.so, libNAME_rocm72.so, libNAME_xpu2025.so.
VARIANT = re.compile(r"lib[\w]+_(cuda\d+|rocm\d+|xpu\d+)\.(so|dll|dylib)$")


def slim(path: str, keep: set[str]) -> tuple[int, int, list[str]]:
    dropped = []
    fd, tmp = tempfile.mkstemp(suffix=".whl", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            m = VARIANT.search(info.filename)
            if m and m.group(1) not in keep:
                dropped.append(info.filename)
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(l for l in lines if l.split(",", 1)[0] not in dropped).encode()
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    before = os.path.getsize(path)
    shutil.move(tmp, path)
    return before, os.path.getsize(path), dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheels", nargs="+")
    ap.add_argument("--keep", default="cuda130", help="comma-separated variants to keep (e.g. cuda130,cuda132)")
    args = ap.parse_args()
    keep = {k for k in args.keep.split(",") if k}
    for path in args.wheels:
        before, after, dropped = slim(path, keep)
        print(f"{os.path.basename(path)}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB, {len(dropped)} libraries dropped "
              f"(kept: {', '.join(sorted(keep))} and the rest)")


if __name__ == "__main__":
    main()
