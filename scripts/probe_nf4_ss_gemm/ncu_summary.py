"""Summary of an Nsight Compute source page (ncu_stalls.sh writes it: `ncu --page source --csv --print-source sass`):
the kernel's warp-state samples in total, the instructions with the most samples and their top stall
reasons, and the samples per opcode. Where warps wait on an mbarrier, the samples land on the branch
after the SYNCS...TRYWAIT (within 3 instructions) that names the barrier's shared-memory offset (printed beside it).
Where the page has the column, the instructions with the most excess shared-memory wavefronts (bank conflicts).

    python scripts/probe_nf4_ss_gemm/ncu_summary.py ncu_..._sass.csv [--top 20]
"""
import argparse
import collections
import csv

ap = argparse.ArgumentParser()
ap.add_argument("csv")
ap.add_argument("--top", type=int, default=20)
args = ap.parse_args()
rows = list(csv.reader(open(args.csv)))
head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
h, data = rows[head], [r for r in rows[head + 1:] if len(r) == len(rows[head])]
col = {c: i for i, c in enumerate(h)}
samples = lambda r: int(r[col["Warp Stall Sampling (All Samples)"]] or 0)  # noqa: E731
stalls = [c for c in h if c.startswith("stall_") and "Not Issued" not in c]
total = sum(samples(r) for r in data)
print(f"{len(data)} instructions, {total} samples")
for n in sorted(range(len(data)), key=lambda n: -samples(data[n]))[: args.top]:
    r = data[n]
    top = sorted(((int(r[col[c]] or 0), c[6:]) for c in stalls), reverse=True)[:2]
    src = r[col["Source"]].strip()
    waits = [data[i][col["Source"]].strip() for i in range(max(0, n - 3), n) if "TRYWAIT" in data[i][col["Source"]]]
    why = f"   <- {waits[-1]}" if waits else ""
    print(f"{samples(r):7d} {100 * samples(r) / total:5.1f}%  #{n:<5d} {src[:60]:60s} {top}{why}")
ops = collections.Counter()
for r in data:
    src = r[col["Source"]].strip().split()
    if src:
        ops[src[1] if src[0].startswith("@") and len(src) > 1 else src[0]] += samples(r)
print("samples by opcode:", ", ".join(f"{op} {v}" for op, v in ops.most_common(12)))
# Shared-memory bank conflicts by instruction, where the source page has the column.
excess = next((c for c in h if c.startswith("L1 Wavefronts Shared Excessive")), None)
if excess is not None:
    value = lambda r: int(float(r[col[excess]].replace(",", "") or 0))  # noqa: E731
    worst = sorted((n for n in range(len(data)) if value(data[n]) > 0), key=lambda n: -value(data[n]))[:10]
    print(f"{excess}: {sum(value(r) for r in data)} in all;",
          "; ".join(f"#{n} {data[n][col['Source']].strip()[:50]} {value(data[n])}" for n in worst) or "none")
