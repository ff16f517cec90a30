"""Summary tables (Markdown) of a full benchmark grid's JSON (python -m lora_fused.bench --json, or
--merge of split runs): lora_linear, nf4_linear, qlora_linear and nf4_dequantize against cuBLAS,
eager torch, PEFT and bitsandbytes, as RESULTS.md quotes them.

    python scripts/grid_summary.py benchmarks/results/session34/h100_full_93b42a5.json
"""

import json
import sys

d = json.load(open(sys.argv[1]))
T = {}
for x in d['results']:
    T[(x['op'], x['mode'], x['provider'], x['k'], x['d'], x['M'], x['r'])] = x['ms']
shapes = [(4096,4096),(4096,11008),(11008,4096),(8192,8192),(4096,14336),(8192,28672)]
def t(op, mode, prov, k, dd, M, r): return T.get((op, mode, prov, k, dd, M, r))
def us(v): return "-" if v is None else f"{v*1000:.1f}" if v < 1 else f"{v*1000:.0f}"
def rat(a, b): return f"{a/b:.2f}" if a and b else "-"
print("lora_linear, r = 16: our time (us) and ours / cuBLAS base (< 1: cheaper than the base GEMM alone); fwd+bwd ours / base, and eager torch / ours, PEFT / ours (> 1: ours faster)\n")
print("| k->d | fwd M=1 | fwd M=16 | fwd M=512 | fwd M=4096 | fwd M=16384 | fwd+bwd M=4096 | fwd+bwd M=16384 | torch/ours fwd+bwd 4096 | PEFT/ours fwd+bwd 4096 |")
print("|---|---|---|---|---|---|---|---|---|---|")
for k, dd in shapes:
    row = [f"{k}->{dd}"]
    for M in (1, 16, 512, 4096, 16384):
        a = t('lora_linear','fwd','lora_fused',k,dd,M,16); b = t('lora_linear','fwd','base_gemm',k,dd,M,16)
        row.append(f"{us(a)} ({rat(a,b)})")
    for M in (4096, 16384):
        a = t('lora_linear','fwdbwd','lora_fused',k,dd,M,16); b = t('lora_linear','fwdbwd','base_gemm',k,dd,M,16)
        row.append(f"{us(a)} ({rat(a,b)})")
    a = t('lora_linear','fwdbwd','lora_fused',k,dd,4096,16)
    row.append(rat(t('lora_linear','fwdbwd','torch',k,dd,4096,16), a)); row.append(rat(t('lora_linear','fwdbwd','peft',k,dd,4096,16), a))
    print("| " + " | ".join(row) + " |")
print("\nlora_linear, ours / cuBLAS base over r = 8 / 16 / 64:\n")
print("| k->d | fwd M=1 | fwd M=16 | fwd M=4096 | fwd M=16384 | fwd+bwd M=4096 | fwd+bwd M=16384 |")
print("|---|---|---|---|---|---|---|")
for k, dd in shapes:
    row = [f"{k}->{dd}"]
    for mode, M in (('fwd',1),('fwd',16),('fwd',4096),('fwd',16384),('fwdbwd',4096),('fwdbwd',16384)):
        row.append(" / ".join(rat(t('lora_linear',mode,'lora_fused',k,dd,M,r), t('lora_linear',mode,'base_gemm',k,dd,M,r)) for r in (8,16,64)))
    print("| " + " | ".join(row) + " |")
print("\nnf4_linear forward: our time (us); ours / cuBLAS bf16 (x @ W^T on the 16-bit weight); bitsandbytes / ours\n")
Ms = (1, 8, 16, 64, 256, 4096, 16384)
print("| k->d | " + " | ".join(f"M={M}" for M in Ms) + " |")
print("|---|" + "---|" * len(Ms))
for k, dd in shapes:
    row = [f"{k}->{dd}"]
    for M in Ms:
        a = t('nf4_linear','fwd','lora_fused',k,dd,M,0); b = t('nf4_linear','fwd','base_gemm',k,dd,M,0); c = t('nf4_linear','fwd','bitsandbytes',k,dd,M,0)
        row.append(f"{us(a)}; {rat(a,b)}; bnb {rat(c,a)}")
    print("| " + " | ".join(row) + " |")
print("\nnf4_linear backward (dX) at M = 4096: ours / cuBLAS bf16 dY @ W; bnb / ours\n")
print("| k->d | bwd us | / cuBLAS | bnb / ours | fwd+bwd / cuBLAS |")
print("|---|---|---|---|---|")
for k, dd in shapes:
    a = t('nf4_linear','bwd','lora_fused',k,dd,4096,0); b = t('nf4_linear','bwd','base_gemm',k,dd,4096,0); c = t('nf4_linear','bwd','bitsandbytes',k,dd,4096,0)
    fa = t('nf4_linear','fwdbwd','lora_fused',k,dd,4096,0); fb = t('nf4_linear','fwdbwd','base_gemm',k,dd,4096,0)
    print(f"| {k}->{dd} | {us(a)} | {rat(a,b)} | {rat(c,a)} | {rat(fa,fb)} |")
print("\nqlora_linear, r = 16: our time (us); ours / cuBLAS bf16 base; PEFT + bitsandbytes / ours\n")
print("| k->d | fwd M=1 | fwd M=16 | fwd M=4096 | fwd+bwd M=512 | fwd+bwd M=4096 | fwd+bwd M=16384 |")
print("|---|---|---|---|---|---|---|")
for k, dd in shapes:
    row = [f"{k}->{dd}"]
    for mode, M in (('fwd',1),('fwd',16),('fwd',4096),('fwdbwd',512),('fwdbwd',4096),('fwdbwd',16384)):
        a = t('qlora_linear',mode,'lora_fused',k,dd,M,16); b = t('qlora_linear',mode,'base_gemm',k,dd,M,16); c = t('qlora_linear',mode,'peft+bnb',k,dd,M,16)
        row.append(f"{us(a)}; {rat(a,b)}; PEFT+bnb {rat(c,a)}")
    print("| " + " | ".join(row) + " |")
print("\nnf4_dequantize (whole weight to bf16): us, share of copy bandwidth (bytes read + written), bnb / ours\n")
print("| k->d | us | bandwidth | bnb / ours |")
print("|---|---|---|---|")
for x in d['results']:
    if x['op']=='nf4_dequantize' and x['provider']=='lora_fused':
        c = t('nf4_dequantize','fwd','bitsandbytes',x['k'],x['d'],0,0)
        print(f"| {x['k']}->{x['d']} | {us(x['ms'])} | {x['tbps']:.2f} TB/s | {rat(c, x['ms'])} |")
