# Builds lora_fused._C: a CUDA extension when nvcc is found, a CPU-only one otherwise.
# Knobs come from the environment only (never sys.argv):
#   LORA_FUSED_CPU_ONLY=1   build without CUDA even when nvcc is there
#   TORCH_CUDA_ARCH_LIST    GPU targets (default "8.0;8.6;8.9;9.0a"; Hopper-only code needs 9.0a)
#   CUDA_HOME / CUDA_PATH   the toolkit root, when it cannot be found from nvcc
#   MAX_JOBS, NVCC_THREADS  build parallelism (MAX_JOBS defaults to what memory allows)
#   CUTLASS_INCLUDE_DIR     CUTLASS/CuTe headers for the Hopper GEMMs (default: the nvidia-cutlass
#                           package's); without them, or without 9.0a in the arch list, the build
#                           leaves the Hopper GEMMs out and those ops run on cuBLAS
# The Hopper GEMMs (csrc/cuda/sm90/*.cu) are compiled apart from the rest, for sm_90a only and with
# NDEBUG: built for every arch they cost ~50 s of nvcc per extra arch each, and CUTLASS's device
# asserts are function calls inside the mainloop that make ptxas serialize its wgmma (warning C7510).
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0a"
VERSION = "0.1.0"


def _is_cuda_root(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home():
    """The toolkit root: from the environment, from where nvcc really lives, or from nvcc itself.

    nvcc on PATH may be a wrapper script (as on our CI machines), so its directory's parent is
    only a candidate; `nvcc --dryrun` prints the real TOP directory as a last resort."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if _is_cuda_root(c):
            return os.path.realpath(c)
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
            m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
            if m and _is_cuda_root(os.path.dirname(m.group(1).rstrip("/"))):
                return os.path.realpath(os.path.dirname(m.group(1).rstrip("/")))
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def wheel_cuda_include_dirs(cuda_home):
    """cuBLAS/cuSPARSE headers from torch's nvidia-* wheels, when the toolkit lacks them."""
    if all(os.path.isfile(os.path.join(cuda_home, "include", h)) for h in ("cublas_v2.h", "cusparse.h")):
        return []
    dirs = []
    for sp in sys.path:
        nv = os.path.join(sp, "nvidia")
        if not os.path.isdir(nv):
            continue
        for pattern in ("cu[0-9]*/include", "cublas/include", "cusparse/include", "cuda_runtime/include"):
            dirs += [d for d in sorted(glob.glob(os.path.join(nv, pattern))) if os.path.isdir(d)]
        if dirs:
            break
    return dirs


def cublaslt_link_args(cuda_home):
    """Linker flags for cuBLASLt (csrc/cuda/blaslt_gemm.cu calls it directly): the copy in torch's
    nvidia-* wheels first, whose soname is the library torch itself loads, else the toolkit's."""
    dirs = []
    for sp in sys.path:
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "cu[0-9]*", "lib"))) + sorted(
            glob.glob(os.path.join(sp, "nvidia", "cublas", "lib")))
    dirs += [os.path.join(cuda_home, d) for d in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))]
    for d in dirs:
        for name in ["libcublasLt.so"] + sorted(os.path.basename(f) for f in glob.glob(os.path.join(d, "libcublasLt.so.[0-9]*"))):
            if os.path.isfile(os.path.join(d, name)):
                return [f"-L{d}", f"-l:{name}"]
    raise RuntimeError(f"lora_fused: no libcublasLt.so found (looked in {dirs}); install torch's CUDA wheels or the CUDA toolkit")


def cutlass_include_dir():
    """CUTLASS 3 headers: $CUTLASS_INCLUDE_DIR, else those the nvidia-cutlass wheel carries."""
    path = os.environ.get("CUTLASS_INCLUDE_DIR")
    if not path:
        import importlib.util

        spec = importlib.util.find_spec("cutlass_library")  # located, not imported (it needs scipy etc.)
        if spec is None or not spec.origin:
            return None
        path = os.path.join(os.path.dirname(spec.origin), "source", "include")
    return path if os.path.isfile(os.path.join(path, "cutlass", "cutlass.h")) else None


def default_max_jobs():
    """One compile job per ~4 GiB of memory (nvcc on CUTLASS-sized files needs ~3.4 GB), capped by cores."""
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8
    return max(1, min(os.cpu_count() or 1, int(mem_gib // 4)))


cpu_only_requested = os.environ.get("LORA_FUSED_CPU_ONLY", "0") not in ("", "0")
cuda_home = None if cpu_only_requested else find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # torch.utils.cpp_extension reads it at import
os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

cpp_sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
sm90_sources = sorted(glob.glob("csrc/cuda/sm90/*.cu"))  # CUTLASS kernels for sm_90a only
# -ffp-contract=off: NF4 decoding must round like bitsandbytes (a*b then +c, never a fused a*b+c).
cxx_flags = [
    "-O3",
    "-ffp-contract=off",
    f'-DLORA_FUSED_VERSION="{VERSION}"',
    f'-DLORA_FUSED_TORCH_VERSION="{torch.__version__}"',
]
include_dirs = [os.path.join(ROOT, "csrc")]

with_sm90 = False
if cuda_home:
    arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    include_dirs += wheel_cuda_include_dirs(cuda_home)
    defines = ["-DLORA_FUSED_WITH_CUDA=1", f'-DLORA_FUSED_ARCH_LIST="{arch_list}"']
    cutlass_dir = cutlass_include_dir()
    with_sm90 = "9.0a" in arch_list.replace(" ", ";").split(";") and cutlass_dir is not None
    if with_sm90:
        include_dirs.append(cutlass_dir)
        defines.append("-DLORA_FUSED_WITH_SM90=1")
    else:
        print(
            "lora_fused: leaving out the Hopper GEMMs ("
            + ("no CUTLASS headers: pip install nvidia-cutlass" if cutlass_dir is None else "9.0a is not in TORCH_CUDA_ARCH_LIST")
            + ")"
        )
    nvcc_flags = [
        "-O3",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "--fmad=false",  # see -ffp-contract=off above; the matmul kernels opt back in with fmaf()
        f"--threads={os.environ.get('NVCC_THREADS', '1')}",
    ] + defines + [f'-DLORA_FUSED_VERSION="{VERSION}"']
    ext = CUDAExtension(
        "lora_fused._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags},
        extra_link_args=cublaslt_link_args(cuda_home),
        py_limited_api=True,
    )
    print(f"lora_fused: building the CUDA extension for TORCH_CUDA_ARCH_LIST={arch_list} with {cuda_home}")
else:
    why = "LORA_FUSED_CPU_ONLY=1" if cpu_only_requested else "no CUDA toolkit (nvcc) was found"
    ext = CppExtension(
        "lora_fused._C", cpp_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags}, py_limited_api=True
    )
    print(f"lora_fused: building the CPU-only extension ({why}); CUDA ops will not be available")


def compile_hopper_objects(build_temp):
    """nvcc each csrc/cuda/sm90/*.cu for sm_90a only, with NDEBUG, in parallel (MAX_JOBS); objects
    newer than their source and the sm90 headers are reused. Returns the object paths."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    flags = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DNDEBUG",
             "-gencode=arch=compute_90a,code=sm_90a", "-Xcompiler", "-fPIC",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    flags += [f"-I{d}" for d in include_dirs] + defines
    if os.environ.get("CC"):  # the host compiler the rest of the extension is built with (as torch does)
        flags = ["-ccbin", os.environ["CC"]] + flags
    # The sm90 files include headers of csrc/cuda/ too (nf4_levels_bf16.cuh, ...).
    headers = [h for d in ("csrc/cuda/sm90", "csrc/cuda") for e in ("cuh", "h") for h in glob.glob(f"{d}/*.{e}")]
    newest_header = max((os.path.getmtime(h) for h in headers), default=0.0)
    out_dir = os.path.join(build_temp, "sm90")
    os.makedirs(out_dir, exist_ok=True)

    def build(src):
        obj = os.path.join(out_dir, os.path.basename(src)[:-3] + ".o")
        if os.path.isfile(obj) and os.path.getmtime(obj) >= max(os.path.getmtime(src), newest_header):
            return obj
        cmd = [nvcc, "-c", src, "-o", obj] + flags
        print(" ".join(cmd), flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"lora_fused: compiling {src} failed (nvcc exit code {done.returncode})")
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=int(os.environ["MAX_JOBS"])) as pool:
        return list(pool.map(build, sm90_sources))


class BuildWithHopperObjects(BuildExtension):
    def build_extensions(self):
        if with_sm90:
            objects = compile_hopper_objects(self.build_temp)
            for e in self.extensions:
                e.extra_objects = [o for o in (e.extra_objects or []) if o not in objects] + objects
                # A rebuilt object must relink the extension even when no other source changed.
                e.depends = [d for d in (e.depends or []) if d not in objects] + objects
        super().build_extensions()


setup(
    name="lora_fused",
    version=VERSION,
    packages=["lora_fused"],
    ext_modules=[ext],
    cmdclass={"build_ext": BuildWithHopperObjects.with_options(use_ninja=True)},
    # _C uses only the dispatcher and CPython's stable ABI (csrc/registration.cpp): one build serves
    # every CPython from 3.10 (torch sets Py_LIMITED_API to it) with the same torch
    # (scripts/build_prebuilt.sh makes one for gpu_check.sh --prebuilt).
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
