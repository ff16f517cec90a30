"""Loads the compiled extension and reports what was built."""

from __future__ import annotations

import importlib

_module = None


def load_extension():
    """Import lora_fused._C (which registers torch.ops.lora_fused.*), with an error that says how to fix it."""
    global _module
    if _module is None:
        try:
            _module = importlib.import_module("lora_fused._C")
        except ImportError as e:
            raise ImportError(
                "lora_fused's compiled extension (lora_fused._C) could not be loaded: "
                f"{e}. Build it with `pip install --no-build-isolation .` from the source tree "
                "(it needs the torch you run with; a CUDA toolkit gives the CUDA kernels). If you are "
                "running from the source tree, note that Python imports the local, unbuilt `lora_fused/` "
                "before the installed package: run from another directory, or install with `-e`."
            ) from e
    return _module


def build_info() -> dict:
    """What this build of lora_fused holds: CUDA kernels or CPU only, for which GPUs, against which torch."""
    import torch

    m = load_extension()
    info = {
        "version": m.VERSION,
        "cuda": bool(m.WITH_CUDA),
        "cuda_arch_list": m.CUDA_ARCH_LIST.split(";") if m.CUDA_ARCH_LIST else [],
        "cuda_version": _cuda_version_str(m.CUDA_VERSION),
        "built_with_torch": m.TORCH_VERSION,
        "torch": torch.__version__,
        "cuda_device_available": bool(m.WITH_CUDA) and torch.cuda.is_available(),
        # CUTLASS GEMMs for Hopper (sm_90a): built when 9.0a was targeted and CUTLASS headers were found.
        "sm90_gemm": bool(getattr(m, "WITH_SM90", 0)),
    }
    return info


def cuda_available() -> bool:
    """True when this build has CUDA kernels and a CUDA device is present."""
    import torch

    return bool(load_extension().WITH_CUDA) and torch.cuda.is_available()


def _cuda_version_str(raw: str) -> str:
    # CUDA_VERSION is e.g. 13000 for 13.0.
    if not raw:
        return ""
    v = int(raw)
    return f"{v // 1000}.{(v % 1000) // 10}"
