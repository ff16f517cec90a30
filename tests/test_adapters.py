"""Adapters in PEFT's format both ways: what lora_fused saves, PEFT loads (same outputs, same key
names as PEFT's own save), and what PEFT saves, lora_fused loads; ranks that differ by layer, rsLoRA,
NF4 bases, and clear errors for what the format or the fused path cannot take."""

import json
import os

import pytest
import torch
from torch import nn

import lora_fused
from _models import Tiny
from conftest import DEVICES

peft = pytest.importorskip("peft", reason="peft is not installed")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")


def _base(device, seed=0):
    torch.manual_seed(seed)
    return Tiny().to(device)


def _randomize_lora(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_fused_adapter_loads_in_peft(device, use_rslora, tmp_path):
    model = _base(device)
    lora_fused.patch(model, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    for layer in (model.q_proj, model.v_proj):
        layer.use_rslora, layer.scaling = use_rslora, 8 / (2.0 if use_rslora else 4)
    _randomize_lora(model)
    x = torch.randn(5, 32, device=device)
    want = model(x)
    assert lora_fused.save_adapter(model, tmp_path) == ["q_proj", "v_proj"]

    peft_model = peft.PeftModel.from_pretrained(_base(device), tmp_path)
    torch.testing.assert_close(peft_model(x), want, rtol=1e-5, atol=1e-5)
    assert peft_model.peft_config["default"].use_rslora == use_rslora

    # The keys are the ones PEFT writes for the same adapter.
    ours = set(safetensors_torch.load_file(os.path.join(tmp_path, "adapter_model.safetensors")))
    peft_model.save_pretrained(tmp_path / "peft")
    theirs = set(safetensors_torch.load_file(os.path.join(tmp_path, "peft", "adapter_model.safetensors")))
    assert ours == theirs


@pytest.mark.parametrize("device", DEVICES)
def test_peft_adapter_loads_in_lora_fused(device, tmp_path):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                             alpha_pattern={"v_proj": 3})
    peft_model = peft.get_peft_model(_base(device), config)
    _randomize_lora(peft_model)
    x = torch.randn(6, 32, device=device)
    want = peft_model(x)
    peft_model.save_pretrained(tmp_path)

    model = _base(device)
    q = model.q_proj
    assert lora_fused.load_adapter(model, tmp_path) == ["q_proj", "v_proj"]
    assert isinstance(model.q_proj, lora_fused.LoraLinear) and model.q_proj.weight is q.weight
    assert (model.q_proj.r, model.v_proj.r, model.v_proj.scaling) == (4, 2, 1.5)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert sorted(lora_fused.unpatch(model)) == ["q_proj", "v_proj"] and model.q_proj is q

    # Into layers that are already LoraLinear: in place, the same Parameter objects.
    lora_fused.patch(model, target_modules=["q_proj"], r=4, lora_alpha=16)
    a = model.q_proj.lora_A
    lora_fused.load_adapter(model, tmp_path)
    assert model.q_proj.lora_A is a
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_round_trip_keeps_ranks_alphas_and_dropout(tmp_path):
    model = _base("cpu")
    lora_fused.patch(model, target_modules=["q_proj"], r=8, lora_alpha=16, lora_dropout=0.1)
    lora_fused.patch(model, target_modules=["v_proj"], r=2, lora_alpha=5, lora_dropout=0.1)
    _randomize_lora(model)
    model.eval()
    x = torch.randn(3, 32)
    want = model(x)
    lora_fused.save_adapter(model, tmp_path, base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny" and config["lora_dropout"] == 0.1
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert {config["r"], *config["rank_pattern"].values()} == {8, 2}

    fresh = _base("cpu").eval()
    lora_fused.load_adapter(fresh, tmp_path)
    assert (fresh.q_proj.r, fresh.v_proj.r, fresh.v_proj.lora_alpha, fresh.q_proj.lora_dropout) == (8, 2, 5, 0.1)
    torch.testing.assert_close(fresh(x), want)


def test_qlora_layers_save_and_load(tmp_path):
    def quantized():
        model = _base("cpu")  # the same base weights, so the same NF4 bytes
        lora_fused.patch(model, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, quantize="nf4")
        return model

    model = quantized()
    _randomize_lora(model)
    x = torch.randn(4, 32)
    want = model(x)
    lora_fused.save_adapter(model, tmp_path)
    fresh = quantized()
    torch.testing.assert_close(fresh.q_proj.weight, model.q_proj.weight, rtol=0, atol=0)
    a = fresh.q_proj.lora_A
    lora_fused.load_adapter(fresh, tmp_path)
    assert fresh.q_proj.lora_A is a
    torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)


def test_bad_adapters_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoraLinear or QLoraLinear"):
        lora_fused.save_adapter(_base("cpu"), tmp_path)

    torch.manual_seed(0)
    dora = peft.get_peft_model(_base("cpu"), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="DoRA"):
        lora_fused.load_adapter(_base("cpu"), tmp_path / "dora")

    plain = peft.get_peft_model(_base("cpu"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "plain")

    class Other(nn.Module):  # q_proj of another width
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(16, 48)

    with pytest.raises(ValueError, match="q_proj is 16->48; the adapter is 32->48"):
        lora_fused.load_adapter(Other(), tmp_path / "plain")

    class Missing(nn.Module):
        pass

    with pytest.raises(ValueError, match="does not have"):
        lora_fused.load_adapter(Missing(), tmp_path / "plain")

    model = _base("cpu")
    lora_fused.patch(model, target_modules=["q_proj"], r=4, lora_alpha=8)
    model.q_proj.merge()
    with pytest.raises(ValueError, match="unmerge"):
        lora_fused.save_adapter(model, tmp_path / "merged")
