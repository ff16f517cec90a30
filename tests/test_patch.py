"""patch()/unpatch() on PEFT models and plain nn.Linear: same outputs and gradients, same Parameter
objects (an optimizer made before the patch keeps training them), same adapter state dict, and what
cannot be fused is left and reported."""

import json

import pytest
import torch
from torch import nn

import lora_fused
from _models import Tiny, Tiny4bit
from conftest import DEVICES, ERROR_FLOOR, rel_err

peft = pytest.importorskip("peft", reason="peft is not installed")


def _peft_model(device, **cfg):
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **cfg)
    model = peft.get_peft_model(Tiny().to(device), config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)  # a trained adapter, not PEFT's zero start
    return model


def _step(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.square().sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
def test_peft_model_same_outputs_gradients_and_parameters(device):
    model = _peft_model(device)
    x = torch.randn(5, 7, 32, device=device)
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = set(peft.get_peft_model_state_dict(model))
    y0, g0 = _step(model, x)
    report = lora_fused.patch(model)
    assert sorted(n.rsplit(".", 1)[-1] for n in report.patched) == ["q_proj", "v_proj"] and not report.left
    y1, g1 = _step(model, x)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5)
    assert all(params_before[n] is p for n, p in model.named_parameters())  # the same Parameter objects
    assert set(peft.get_peft_model_state_dict(model)) == keys_before
    assert lora_fused.unpatch(model)
    y2, _ = _step(model, x)
    torch.testing.assert_close(y2, y0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("option", [dict(use_rslora=True), dict(rank_pattern={"v_proj": 8}, alpha_pattern={"v_proj": 32}),
                                    dict(bias="all"), dict(bias="lora_only"), dict(init_lora_weights="gaussian"),
                                    dict(lora_dropout=0.2)], ids=["rslora", "rank_pattern", "bias_all", "bias_lora_only",
                                                                  "gaussian", "dropout_eval"])
def test_peft_config_options_fuse_with_the_same_results(option, device):
    # LoraConfig options that change the scaling, the rank per layer, which biases train, or the
    # init: the fused layers read PEFT's own scaling and parameters. Dropout is compared in eval mode.
    model = _peft_model(device, **option)
    if "lora_dropout" in option:
        model.eval()
    x = torch.randn(5, 32, device=device)
    y0, g0 = _step(model, x)
    report = lora_fused.patch(model)
    assert len(report.patched) == 2 and not report.left, report
    y1, g1 = _step(model, x)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_made_before_the_patch_trains_the_same_tensors(device):
    ref, fused = _peft_model(device), _peft_model(device)
    x = torch.randn(16, 32, device=device)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (ref, fused)]
    lora_fused.patch(fused)
    for m, opt in zip((ref, fused), opts):
        for _ in range(3):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (n, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_what_cannot_be_fused_is_left_and_reported():
    model = _peft_model("cpu", use_dora=True)
    report = lora_fused.patch(model)
    assert not report.patched and len(report.left) == 2
    assert all("DoRA" in why for why in report.left.values())
    assert "left" in str(report)


def test_plain_linear_target_modules_and_unpatch():
    torch.manual_seed(0)
    model = Tiny()
    q = model.q_proj
    x = torch.randn(3, 32)
    y0 = model(x)
    report = lora_fused.patch(model, target_modules=["q_proj"], r=4, lora_alpha=8)
    assert report.patched == ["q_proj"] and isinstance(model.q_proj, lora_fused.LoraLinear)
    assert model.q_proj.weight is q.weight and model.q_proj.bias is q.bias
    # The replaced Linear is remembered for unpatch() without entering the model a second time.
    assert sorted(model.state_dict()) == sorted(
        ["q_proj.weight", "q_proj.bias", "q_proj.lora_A", "q_proj.lora_B", "v_proj.weight", "out.weight", "out.bias"]
    )
    torch.testing.assert_close(model(x), y0)  # B starts at zero, as in PEFT
    assert lora_fused.unpatch(model) == ["q_proj"] and model.q_proj is q


@pytest.mark.parametrize("device", DEVICES)
def test_plain_linear_quantize_nf4_gives_qlora_layers(device):
    torch.manual_seed(0)
    model = Tiny().to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    x = torch.randn(3, 32, device=device, dtype=model.q_proj.weight.dtype)
    w16 = {n: model.get_submodule(n).weight.detach().clone() for n in ("q_proj", "v_proj")}
    report = lora_fused.patch(model, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, quantize="nf4")
    assert sorted(report.patched) == ["q_proj", "v_proj"]
    for n, w in w16.items():
        layer = model.get_submodule(n)
        assert type(layer) is lora_fused.QLoraLinear and layer.weight.dtype == torch.uint8
        # the NF4 weight is the quantized 16-bit one (error of 4-bit levels, not garbage)
        err = (layer.dequantize(w.dtype).float() - w.float()).norm() / w.float().norm()
        assert err < 0.15, f"{n}: NF4 relative error {err:.3f}"
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    assert trainable == ["q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"]
    y = model(x)
    y.float().square().sum().backward()
    assert model.q_proj.lora_B.grad is not None and torch.isfinite(model.q_proj.lora_B.grad).all()
    assert sorted(lora_fused.unpatch(model)) == ["q_proj", "v_proj"]
    assert type(model.q_proj) is nn.Linear
    back = model.q_proj.weight.detach().float()
    assert (back - w16["q_proj"].float()).norm() / w16["q_proj"].float().norm() < 0.15  # the dequantized weight


def test_patch_rejects_unknown_quantization():
    with pytest.raises(ValueError, match="quantize must be None or 'nf4'"):
        lora_fused.patch(Tiny(), target_modules=["q_proj"], quantize="int8")


def _compute_dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def _peft_qlora(device, compute_dtype):
    model = peft.get_peft_model(Tiny4bit(device, compute_dtype), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("device", DEVICES)
def test_peft_qlora_model_same_outputs_gradients_and_parameters(device):
    dt = _compute_dtype(device)
    model = _peft_qlora(device, dt)
    x = torch.randn(5, 7, 128, device=device)
    params_before = dict(model.named_parameters())
    y0, g0 = _step(model, x)
    report = lora_fused.patch(model)
    assert sorted(n.rsplit(".", 1)[-1] for n in report.patched) == ["q_proj", "v_proj"] and not report.left
    y1, g1 = _step(model, x)
    assert g1.keys() == g0.keys() and any("lora_A" in n for n in g1)
    # The reference: the same NF4 bytes and adapter computed in fp32 (PEFT + bitsandbytes). PEFT runs
    # the adapter in fp32 and the base in the compute dtype; lora_fused runs both in the compute dtype.
    # In fp32 (CPU) that is the same computation; in bf16 our error may be at most 2x PEFT's own.
    ref = _peft_qlora(device, torch.float32)
    with torch.no_grad():
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            q.copy_(p)
    y_ref, g_ref = _step(ref, x)
    for what, ours, peft_, want in [("output", y1, y0, y_ref)] + [(n, g1[n], g0[n], g_ref[n]) for n in g0]:
        e_ours, e_peft = rel_err(ours, want), rel_err(peft_, want)
        assert e_ours <= 2 * e_peft + ERROR_FLOOR[dt], f"{what}: error {e_ours:.2e} against fp32, PEFT's {e_peft:.2e}"
    assert all(params_before[n] is p for n, p in model.named_parameters())
    assert sorted(lora_fused.unpatch(model)) == sorted(report.patched)
    torch.testing.assert_close(_step(model, x)[0], y0)


@pytest.mark.parametrize("device", DEVICES)
def test_bitsandbytes_layers_become_nf4_and_qlora_layers(device):
    dt = _compute_dtype(device)
    model = Tiny4bit(device, dt)
    originals = {n: model.get_submodule(n) for n in ("q_proj", "v_proj")}
    x = torch.randn(3, 128, device=device)
    y0 = model(x)
    report = lora_fused.patch(model, target_modules=["v_proj"], r=4, lora_alpha=8)
    assert sorted(report.patched) == ["q_proj", "v_proj"] and not report.left
    assert type(model.q_proj) is lora_fused.NF4Linear and type(model.v_proj) is lora_fused.QLoraLinear
    assert model.q_proj.bias is originals["q_proj"].bias
    assert model.q_proj.weight.data_ptr() == originals["q_proj"].weight.data_ptr()  # the same NF4 bytes
    tol = {"rtol": 2e-2, "atol": 2e-2} if dt == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(model(x), y0, **tol)  # B starts at zero
    assert sorted(lora_fused.unpatch(model)) == ["q_proj", "v_proj"]
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert not lora_fused.patch(model, bnb_layers=False).patched


def test_fp4_bitsandbytes_layers_are_left_and_reported():
    bnb = pytest.importorskip("bitsandbytes")
    model = Tiny4bit("cpu", torch.float32)
    fp4 = bnb.nn.Linear4bit(128, 256, compute_dtype=torch.float32, quant_type="fp4")
    fp4.load_state_dict(nn.Linear(128, 256).state_dict())
    model.q_proj = fp4.to("cpu")
    report = lora_fused.patch(model)
    assert report.patched == ["v_proj"] and "quant_type 'fp4'" in report.left["q_proj"]
    lora_fused.unpatch(model)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    report = lora_fused.patch(peft_model)
    assert len(report.patched) == 1 and any("fp4" in why for why in report.left.values())


def _patched(kind, device):
    if kind in ("peft-bnb", "bnb"):
        model = Tiny4bit(device, _compute_dtype(device))
        x = torch.randn(4, 128, device=device)
    else:
        torch.manual_seed(0)
        model = Tiny().to(device)
        x = torch.randn(4, 32, device=device)
    if kind.startswith("peft"):
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        report = lora_fused.patch(model)
    elif kind == "bnb":
        report = lora_fused.patch(model, target_modules=["v_proj"], r=4, lora_alpha=8)
    else:
        report = lora_fused.patch(model, target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8,
                                  quantize="nf4" if kind == "nf4" else None)
    assert len(report.patched) == 2 and not report.left
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return model, x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["plain", "nf4", "peft", "peft-bnb", "bnb"])
def test_torch_compile_fullgraph_of_a_patched_model(device, kind):
    """fullgraph; on CUDA with mode="reduce-overhead" (CUDA graphs of forward and backward, replayed)."""
    model, x = _patched(kind, device)
    if device == "cpu":
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    else:
        compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # compiled first (nothing cached by an eager call before); then recorded and replayed
        model.zero_grad(set_to_none=True)
        y_c = compiled(x)
        y_c.square().sum().backward()
        y_c = y_c.detach().clone()  # graph outputs are overwritten by the next replay
    g_c = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    y_e, g_e = _step(model, x)
    torch.testing.assert_close(y_c, y_e, rtol=2e-2, atol=2e-2)
    assert g_c.keys() == g_e.keys() and g_c
    for n in g_e:
        assert rel_err(g_c[n], g_e[n]) < 2e-2, n


def test_transformers_model_with_bnb_layers_keeps_its_state_dict():
    """A transformers Llama whose projections are bitsandbytes NF4 layers (as BitsAndBytesConfig
    loads it): after patch() the same outputs, and a state dict with the same keys and bytes, so
    checkpoints and save_pretrained keep working."""
    transformers = pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    for name, lin in list(model.named_modules()):
        if isinstance(lin, nn.Linear) and name != "lm_head":
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
            q.load_state_dict(lin.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to("cpu"))
    ids = torch.randint(0, 64, (2, 16))
    want = model(input_ids=ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = lora_fused.patch(model)
    assert len(report.patched) == 7 and not report.left  # q, k, v, o, gate, up, down
    torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        if k.endswith("bitsandbytes__nf4"):  # JSON metadata; ours is padded with spaces (fixed size for DCP)
            assert json.loads(bytes(after[k].tolist())) == json.loads(bytes(v.tolist())), k
        else:
            assert torch.equal(after[k].cpu(), v.cpu()), k


# Small configs of the architectures users fine-tune with PEFT (dropout off: the comparison reruns the
# model), and what patch() must fuse: every linear layer that PEFT's "all-linear" adapts (lm_head
# excepted), two decoder layers each; GPT-2's Conv1D projections (weights stored transposed) are left
# to PEFT and reported.
_SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32)
_ARCHS = {
    "llama": ("LlamaConfig", _SMALL, 14),
    "mistral": ("MistralConfig", _SMALL, 14),
    "qwen2": ("Qwen2Config", _SMALL, 14),  # q, k, v with bias
    "qwen3": ("Qwen3Config", dict(_SMALL, head_dim=16), 14),
    "gemma": ("GemmaConfig", dict(_SMALL, head_dim=16), 14),
    "phi3": ("Phi3Config", dict(_SMALL, pad_token_id=0), 8),  # fused qkv_proj and gate_up_proj
    "opt": ("OPTConfig", dict(vocab_size=64, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=32, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0,
                              activation_dropout=0.0, layerdrop=0.0), 12),
    "gpt2": ("GPT2Config", dict(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0), 0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", list(_ARCHS))
def test_peft_all_linear_on_transformers_architectures(arch, device):
    transformers = pytest.importorskip("transformers")
    config_class, kwargs, fused = _ARCHS[arch]
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(device)
    # (GPT-2's Conv1D stores its weight transposed: PEFT wants fan_in_fan_out there.)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=arch == "gpt2")
    model = peft.get_peft_model(model, lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 64, (2, 12), device=device)

    def step():
        model.zero_grad(set_to_none=True)
        y = model(input_ids=ids).logits
        y.square().mean().backward()
        return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    y0, g0 = step()
    report = lora_fused.patch(model)
    assert len(report.patched) == fused, report
    if fused == 0:  # GPT-2: every adapted layer is a Conv1D, left and reported
        assert len(report.left) == 8 and all("Conv1D" in why for why in report.left.values()), report
    else:
        assert not report.left, report
    y1, g1 = step()
    assert rel_err(y1, y0) < 1e-5, rel_err(y1, y0)
    assert g1.keys() == g0.keys() and any("lora_A" in n for n in g0)
    for n in g0:
        assert rel_err(g1[n], g0[n]) < 1e-4, (n, rel_err(g1[n], g0[n]))
    assert len(lora_fused.unpatch(model)) == fused
    torch.testing.assert_close(step()[0], y0)
