"""The fused layers under DistributedDataParallel and FSDP2 (fully_shard), two processes: gloo on CPU
(runs everywhere, CI included) and NCCL on two GPUs. The cases themselves are in _distributed_cases."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _distributed_cases as cases
from conftest import HAS_CUDA, CUDA_SKIP_REASON

WORLD = 2
BACKENDS = [
    pytest.param("gloo", id="cpu-gloo"),
    pytest.param(
        "nccl",
        id="cuda-nccl",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON),
            pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} GPUs"),
        ],
    ),
]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(case, backend: str, tmp_path) -> None:
    if backend == "nccl":
        # NVLink multicast stays off on shared hosts (it can take every GPU of the host down).
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    mp.spawn(case, args=(WORLD, _free_port(), backend, str(tmp_path)), nprocs=WORLD, join=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddp_trains_like_one_process(backend, tmp_path):
    _spawn(cases.ddp_case, backend, tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_shards_nf4_trains_and_checkpoints(backend, tmp_path):
    _spawn(cases.fsdp_case, backend, tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_with_nf4_storage_ignored_trains_and_checkpoints(backend, tmp_path):
    _spawn(cases.fsdp_nf4_whole_case, backend, tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsdp2_bf16_mixed_precision_keeps_nf4_storage(backend, tmp_path):
    _spawn(cases.fsdp_mixed_precision_case, backend, tmp_path)


def test_fsdp_ignored_params_names_the_nf4_storage_where_fsdp2_cannot_shard_it():
    import lora_fused
    from lora_fused.distributed import FSDP2_SHARDS_INTEGER_PARAMS, nf4_storage_params

    q = lora_fused.QLoraLinear(64, 32, r=4, compute_dtype=torch.float32)
    nf = lora_fused.NF4Linear(32, 16, compute_dtype=torch.float32, double_quant=False)
    model = torch.nn.Sequential(q, lora_fused.LoraLinear(32, 32), nf)
    want = {q.weight, q.nf4_state.weight.absmax, nf.weight}  # fp32 absmax is a buffer, not a parameter
    assert nf4_storage_params(model) == want
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    assert FSDP2_SHARDS_INTEGER_PARAMS == ((major, minor) >= (2, 12))
    assert lora_fused.fsdp_ignored_params(model) == (set() if FSDP2_SHARDS_INTEGER_PARAMS else want)
