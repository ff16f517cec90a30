"""Worker side of tests/test_distributed.py: each function runs in every process of a
torch.multiprocessing.spawn group (gloo on CPU, NCCL on GPUs) and asserts; a failure on any rank
fails the test with that rank's traceback.

The model mixes all three fused layers (QLoraLinear with double-quantized NF4, LoraLinear, NF4Linear
with fp32 absmax and an odd block count, so FSDP2 pads its shards). Every rank builds the same model
and a single-process reference copy; the global batch is split across ranks and the loss is a mean
over each rank's half, so DDP's and FSDP2's averaged gradients equal the reference's full-batch ones.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import lora_fused as LF
from lora_fused.distributed import FSDP2_SHARDS_INTEGER_PARAMS, nf4_storage_params

K, H, N, BATCH, STEPS, LR = 96, 80, 40, 8, 2, 0.05
NF4_LAYERS = ("0", "4")  # names in the Sequential


def init(rank: int, world: int, port: int, backend: str) -> torch.device:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def finish() -> None:
    """Every rank reaches here, with all its checks passed, before any tears the group down; then the
    process leaves without interpreter finalization. FSDP2's meshes keep the gloo group alive past
    destroy_process_group, and its worker threads, torn down during finalization, can abort the
    process ("terminate called without an active exception", SIGABRT). CI saw that once in
    test_fsdp2_bf16_mixed_precision_keeps_nf4_storage, with no Python traceback from either rank."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # exit code 0 is what mp.spawn checks; a failed assert above exits 1 with its traceback


def build_model(device: torch.device, seed: int = 1234) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    compute = torch.bfloat16 if device.type == "cuda" else torch.float32

    def linear(k, n):
        lin = nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
            lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
        return lin.to(device)

    q = LF.QLoraLinear.from_linear(linear(K, H), r=8, lora_alpha=16, compute_dtype=compute, lora_dtype=torch.float32)
    lo = LF.LoraLinear.from_linear(linear(H, H), r=4, lora_alpha=8)
    nf = LF.NF4Linear.from_linear(linear(H, N), blocksize=128, compute_dtype=compute, double_quant=False)
    with torch.no_grad():  # B starts at zero in PEFT's init; make every gradient non-trivial
        for layer in (q, lo):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return nn.Sequential(q, nn.GELU(), lo, nn.GELU(), nf)


def batch(device: torch.device, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, K, generator=g).to(device), torch.randn(BATCH, N, generator=g).to(device)


def train(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    """STEPS of SGD on mean squared error; returns each step's output."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    outs = []
    for _ in range(STEPS):
        y = model(x)
        outs.append(y.detach().float())
        nn.functional.mse_loss(y.float(), t).backward()
        opt.step()
        opt.zero_grad()
    return outs


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def tol(device: torch.device) -> dict:
    # bf16 compute on GPUs: a half batch may take another kernel path (tile shapes) than the full one
    return dict(rtol=2e-2, atol=2e-2) if device.type == "cuda" else dict(rtol=1e-5, atol=1e-6)


def assert_same_state(got: dict, ref: dict, device: torch.device, what: str) -> None:
    assert list(got) == list(ref), f"{what}: keys {list(got)} != {list(ref)}"
    for k, r in ref.items():
        v = full(got[k]).cpu()
        r = r.cpu()
        assert v.dtype == r.dtype and v.shape == r.shape, f"{what}: {k} is {v.dtype}{tuple(v.shape)}, want {r.dtype}{tuple(r.shape)}"
        if r.is_floating_point() and k.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "bias"):
            torch.testing.assert_close(v, r, **tol(device), msg=lambda m: f"{what}: {k}: {m}")
        else:  # frozen weights and the NF4 state travel bit for bit
            assert torch.equal(v, r), f"{what}: {k} differs"


def reference(device: torch.device):
    model = build_model(device)
    ref = copy.deepcopy(model)
    x, t = batch(device)
    ref_outs = train(ref, x, t)
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    return model, ref, ref_outs, x[rows], t[rows], rows


def ddp_case(rank: int, world: int, port: int, backend: str, tmpdir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = init(rank, world, port, backend)
    model, ref, ref_outs, x, t, rows = reference(device)
    ddp = DDP(model, device_ids=[rank] if device.type == "cuda" else None)
    outs = train(ddp, x, t)
    for step, (o, r) in enumerate(zip(outs, ref_outs)):
        torch.testing.assert_close(o, r[rows], **tol(device), msg=lambda m: f"DDP step {step} output: {m}")
    assert_same_state(ddp.module.state_dict(), ref.state_dict(), device, "DDP state dict")
    # a checkpoint written by rank 0 loads into a fresh single-process model and computes the same
    path = os.path.join(tmpdir, "ddp.pt")
    if rank == 0:
        torch.save(ddp.module.state_dict(), path)
    dist.barrier()
    fresh = build_model(device, seed=99)
    fresh.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ddp.module(x), rtol=0, atol=0)
    finish()


def shard(model: nn.Module, mp_policy=None, nf4_whole: bool = False) -> nn.Module:
    """fully_shard per layer and at the root, as users do; the NF4 storage ignored (kept whole) where
    lora_fused.fsdp_ignored_params says so, or always with nf4_whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kw = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    ignored = nf4_storage_params if nf4_whole else LF.fsdp_ignored_params
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, ignored_params=ignored(layer), **kw)
    fully_shard(model, ignored_params=ignored(model), **kw)
    return model


def assert_nf4_sharded(model: nn.Module, nf4_whole: bool) -> None:
    """The NF4 storage is sharded (PyTorch >= 2.12), or kept whole where FSDP2 cannot hold uint8
    parameters (it was passed as ignored_params: see lora_fused.distributed)."""
    world = dist.get_world_size()
    if nf4_whole or not FSDP2_SHARDS_INTEGER_PARAMS:
        for p in nf4_storage_params(model):
            assert not hasattr(p, "to_local") and p.dtype == torch.uint8, f"NF4 storage {type(p).__name__} {p.dtype}"
        return
    for name in NF4_LAYERS:
        layer = model.get_submodule(name)
        absmax = layer.nf4_state.weight.absmax
        if absmax.dtype == torch.float32:  # double_quant=False: a replicated buffer (see _nf4_storage)
            assert not hasattr(absmax, "to_local"), f"layer {name}: fp32 absmax should be a plain buffer"
            absmax = None
        for what, p in (("weight", layer.weight), ("absmax", absmax)):
            if p is None:
                continue
            assert hasattr(p, "to_local"), f"layer {name} {what} is not sharded (a {type(p).__name__})"
            assert p.dtype == torch.uint8, f"layer {name} {what} is {p.dtype}"
            rows, local = p.shape[0], p.to_local().shape[0]
            assert local <= -(-rows // world) and local < rows, f"layer {name} {what}: {local} of {rows} rows on this rank"


def fsdp_nf4_whole_case(rank: int, world: int, port: int, backend: str, tmpdir: str) -> None:
    """fsdp_case with the NF4 storage passed as ignored_params (what PyTorch < 2.12 needs)."""
    fsdp_case(rank, world, port, backend, tmpdir, nf4_whole=True)


def fsdp_case(rank: int, world: int, port: int, backend: str, tmpdir: str, nf4_whole: bool = False) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    device = init(rank, world, port, backend)
    model, ref, ref_outs, x, t, rows = reference(device)
    model = shard(model, nf4_whole=nf4_whole)
    assert_nf4_sharded(model, nf4_whole)
    outs = train(model, x, t)
    for step, (o, r) in enumerate(zip(outs, ref_outs)):
        torch.testing.assert_close(o, r[rows], **tol(device), msg=lambda m: f"FSDP2 step {step} output: {m}")
    assert_nf4_sharded(model, nf4_whole)  # still sharded after forward/backward (resharded, not left gathered)

    # the state dict gathered from the shards is the unsharded model's, with bitsandbytes' keys
    ref_sd = ref.state_dict()
    assert_same_state(model.state_dict(), ref_sd, device, "FSDP2 state_dict() gathered")
    full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    assert_same_state(full_sd, ref_sd, device, "get_model_state_dict(full_state_dict=True)")
    rank0_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # with cpu_offload only rank 0 gets the (CPU) state dict
        assert_same_state(rank0_sd, ref_sd, device, "get_model_state_dict(full_state_dict=True, cpu_offload=True)")

    with torch.no_grad():
        want = model(x)
    # a sharded checkpoint (torch.distributed.checkpoint) loads into a differently initialised sharded model
    ckpt = os.path.join(tmpdir, "dcp")
    dcp.save(model.state_dict(), checkpoint_id=ckpt)
    other = shard(build_model(device, seed=99), nf4_whole=nf4_whole)
    sd = other.state_dict()
    dcp.load(sd, checkpoint_id=ckpt)
    other.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(other(x), want, rtol=0, atol=0, msg=lambda m: f"after dcp.load: {m}")
    # ... and so does the gathered full state dict, through the checkpoint helpers, on every rank
    # or broadcast from rank 0's CPU copy (as accelerate loads FSDP2 models)
    for how, sd, opts in (
        ("full_state_dict", full_sd, StateDictOptions(full_state_dict=True)),
        ("broadcast_from_rank0", rank0_sd, StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)),
    ):
        third = shard(build_model(device, seed=98), nf4_whole=nf4_whole)
        set_model_state_dict(third, dict(sd), options=opts)  # (it puts the sharded tensors into the dict)
        with torch.no_grad():
            torch.testing.assert_close(third(x), want, rtol=0, atol=0, msg=lambda m: f"set_model_state_dict({how}): {m}")
    # ... and into one plain, unsharded model
    plain = build_model(device, seed=97)
    plain.load_state_dict({k: v.to(device) for k, v in full_sd.items()})
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want, rtol=0, atol=0, msg=lambda m: f"unsharded load: {m}")
    finish()


def fsdp_mixed_precision_case(rank: int, world: int, port: int, backend: str, tmpdir: str) -> None:
    """FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), as QLoRA recipes run it:
    the uint8 NF4 storage must reach the kernels unchanged (no rounding of absmax through bf16)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    device = init(rank, world, port, backend)
    model, ref, ref_outs, x, t, rows = reference(device)
    model = shard(model, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    outs = train(model, x, t)
    for step, (o, r) in enumerate(zip(outs, ref_outs)):
        # LoRA weights and the LoraLinear base now run in bf16: compare at bf16 resolution
        torch.testing.assert_close(o, r[rows], rtol=5e-2, atol=5e-2, msg=lambda m: f"FSDP2+bf16 step {step}: {m}")
    sd = model.state_dict()
    for name in NF4_LAYERS:  # the NF4 state is untouched by the bf16 policy
        for key in ("weight", "weight.absmax"):
            assert torch.equal(full(sd[f"{name}.{key}"]).cpu(), ref.state_dict()[f"{name}.{key}"].cpu()), f"{name}.{key} changed"
    finish()
