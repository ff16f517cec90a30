"""QLoRA fine-tuning of a small Llama: PEFT + bitsandbytes, then the same script with one line added,
`lora_fused.patch(model)`; or lora_fused alone on several processes (DDP or FSDP2).

    python examples/finetune_tiny_llama.py                        # one device: both, side by side
    python examples/finetune_tiny_llama.py --which fused --save out/   # patched only; PEFT-format adapter
    torchrun --nproc_per_node 2 examples/finetune_tiny_llama.py --dist fsdp --save out/

The model is built by transformers from a config with random weights (nothing is downloaded), its
attention and MLP projections quantized to NF4 by bitsandbytes (double quantization) with a PEFT LoRA
adapter on each, and trained on synthetic token sequences (random segments repeated, so the loss can
fall). Both runs build the same model (same NF4 bytes, same adapter) and see the same batches; the
second is patched. Under torchrun the model is quantized by lora_fused.patch(quantize="nf4") instead,
whose NF4 layers FSDP2 can shard. On a CPU it runs a much smaller model, and says so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

import lora_fused

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    gpu = p.parse_known_args()[0].device == "cuda"
    p.add_argument("--steps", type=int, default=50 if gpu else 8)
    p.add_argument("--batch", type=int, default=8 if gpu else 2, help="sequences per step (per process)")
    p.add_argument("--seq", type=int, default=512 if gpu else 64)
    p.add_argument("--hidden", type=int, default=1024 if gpu else 128)
    p.add_argument("--layers", type=int, default=4 if gpu else 2)
    p.add_argument("--vocab", type=int, default=8192 if gpu else 512)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--which", choices=["both", "fused", "peft"], default="both" if gpu else "fused")
    p.add_argument("--dist", choices=["fsdp", "ddp"], default="fsdp", help="under torchrun: how to spread the model")
    p.add_argument("--save", help="write the trained adapter (LoRA tensors, full) here")
    return p.parse_args()


def build_llama(args, device, dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 128, 2),
        num_key_value_heads=max(args.hidden // 256, 1), max_position_embeddings=args.seq, use_cache=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.requires_grad_(False)  # the base is frozen; only the adapters train
    return model


def nf4_fused_model(args, device, dtype) -> nn.Module:
    """A plain transformers model quantized and adapted by lora_fused itself (the torchrun mode)."""
    model = build_llama(args, device, dtype)
    report = lora_fused.patch(model, target_modules=TARGETS, r=args.r, lora_alpha=args.alpha, quantize="nf4")
    assert not report.left, str(report)
    return model


def peft_bnb_model(args, device, dtype) -> nn.Module:
    import bitsandbytes as bnb
    import peft

    model = build_llama(args, "cpu", dtype)
    for name, lin in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in TARGETS:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype,
                                  compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q)
    model = model.to(device)  # bitsandbytes quantizes as the weights move
    config = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def batch(args, step: int, rank: int, device) -> torch.Tensor:
    """Random 32-token segments, each repeated to fill the sequence: a copy task LoRA can learn."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    seg = torch.randint(0, args.vocab, (args.batch, 32), generator=g)
    return seg.repeat(1, -(-args.seq // 32))[:, : args.seq].to(device)


def train(model: nn.Module, args, device, rank: int = 0, world: int = 1) -> tuple[list[float], list[float]]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses, times = [], []
    for step in range(args.steps):
        ids = batch(args, step, rank, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        loss = loss.detach().float()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"  step {step:3d}  loss {losses[-1]:.4f}  {times[-1] * 1e3:7.1f} ms", flush=True)
    return losses, times


def peak_mib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def single(args) -> None:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        print(f"no GPU: a small model on the CPU (hidden {args.hidden}, {args.layers} layers, {args.steps} steps)")
    runs: dict[str, tuple[list[float], list[float], float]] = {}
    for which in (["peft", "fused"] if args.which == "both" else [args.which]):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = peft_bnb_model(args, device, dtype)
        if which == "fused":
            report = lora_fused.patch(model)  # the one line: PEFT's QLoRA layers now run lora_fused
            assert not report.left, str(report)
        print(f"{which}: training {sum(p.numel() for p in model.parameters() if p.requires_grad):,} adapter parameters")
        losses, times = train(model, args, device)
        runs[which] = (losses, times, peak_mib(device))
        if which == "fused" and args.save:
            model.save_pretrained(args.save)  # PEFT's own save: the parameters are PEFT's
            print(f"saved the adapter (PEFT format) to {args.save}")
        del model
    print(f"\n{'':8s}{'median step':>14s}{'peak memory':>14s}{'final loss':>12s}")
    for which, (losses, times, peak) in runs.items():
        print(f"{which:8s}{statistics.median(times[1:] or times) * 1e3:11.1f} ms{peak:10.0f} MiB{losses[-1]:12.4f}")
    if len(runs) == 2:
        (lp, tp, _), (lf, tf, _) = runs["peft"], runs["fused"]
        drift = max(abs(a - b) / abs(a) for a, b in zip(lp, lf))
        speedup = statistics.median(tp[1:] or tp) / statistics.median(tf[1:] or tf)
        print(f"lora_fused step {speedup:.2f}x faster; losses agree within {drift * 100:.2f}% over {args.steps} steps")


def distributed(args) -> None:
    """torchrun mode: lora_fused's QLoRA layers under FSDP2 (fully_shard per decoder layer) or DDP."""
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = args.device == "cuda"
    if cuda:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (shared hosts)
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = nf4_fused_model(args, device, dtype)
    plain = model
    if args.dist == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        # ignored_params: only on PyTorch < 2.12, whose FSDP2 cannot shard the uint8 NF4 storage
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, ignored_params=lora_fused.fsdp_ignored_params(layer))
        fully_shard(model, mesh=mesh, ignored_params=lora_fused.fsdp_ignored_params(model))
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[local] if cuda else None)
    if rank == 0:
        print(f"{args.dist} on {world} processes ({device.type}), {args.batch} sequences per process per step")
    losses, times = train(model, args, device, rank, world)
    peak = torch.tensor([peak_mib(device)], device=device)
    if cuda:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"median step {statistics.median(times[1:] or times) * 1e3:.1f} ms, peak memory per process "
              f"{peak.item():.0f} MiB, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if args.save:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            lora_fused.save_adapter(plain, args.save, state_dict=sd)  # PEFT's format, from the gathered tensors
            print(f"saved the adapter (PEFT format) to {args.save}")
    dist.destroy_process_group()


if __name__ == "__main__":
    arguments = parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        distributed(arguments)
    else:
        single(arguments)
