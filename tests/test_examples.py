"""The examples run end to end (small sizes): one process, and torchrun with 2 processes (gloo on
CPU; NCCL when the machine has 2 GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the example builds its model with transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_tiny_llama.py"
TINY = ["--steps", "3", "--batch", "2", "--seq", "64", "--hidden", "128", "--layers", "2", "--vocab", "256"]


def _run(cmd: list[str], tmp_path: Path) -> str:
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _check_adapter(path: Path, layers: int = 2) -> None:
    """A PEFT-format adapter: A and B of 7 projections per decoder layer under PEFT's key names."""
    from safetensors.torch import load_file

    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    lora = load_file(path / "adapter_model.safetensors")
    assert len(lora) == 2 * 7 * layers, sorted(lora)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in lora, sorted(lora)
    assert all(torch.isfinite(v).all() for v in lora.values())
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in lora.items()), "the adapter did not train"


def test_one_process_patched_peft_on_cpu(tmp_path):
    pytest.importorskip("peft", reason="the one-process example trains a PEFT model")
    pytest.importorskip("bitsandbytes", reason="the one-process example quantizes with bitsandbytes")
    out = _run([sys.executable, str(EXAMPLE), "--device", "cpu", "--which", "fused", *TINY, "--save", "out"], tmp_path)
    assert "no GPU: a small model on the CPU" in out and "fused" in out
    _check_adapter(tmp_path / "out")


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("how", ["fsdp", "ddp"])
def test_torchrun_two_processes(how, device, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE),
           "--device", device, "--dist", how, *TINY, "--save", "out"]
    out = _run(cmd, tmp_path)
    assert f"{how} on 2 processes ({device})" in out and "saved the adapter" in out
    _check_adapter(tmp_path / "out")
