"""The NF4 block-aligned decode kernel's shared-memory arithmetic (SmemLayout, lora_smem_bytes,
red_bytes in csrc/cuda/nf4_gemv_blockaligned.cu), replicated on the CPU: for 16- and 32-row warp
steps, which ranks and token counts can stage the LoRA term in shared memory (S) or read it from
global memory (g), and whose strip sums are deferred (d) or made with the team's barriers (b).
Keep it in step with the C++ when either changes; the tests of the dispatch take their cases from it.

    python scripts/nf4_decode_smem_layout.py [--limit 232448] [--plain-absmax]

--limit: the GPU's shared memory a block may opt in to (sharedMemPerBlockOptin; H100 and H200: 227 KiB).
"""

import argparse

RESERVED = 1024  # bytes sm80-sm90 reserve before a block's dynamic shared memory


def tile_bytes(nested):
    return 16 * 128 + (128 if nested else 256)


def lora_b_stride(r):
    return r + 8 if (r // 8) % 2 == 0 else r


def red_bytes(rows, nt, defer):
    return 32 + (2 if defer else 1) * 4 * 8 * rows * (8 * nt + 1)


def lora_bytes(rows, m, r, defer, teams):
    return 4 * m * r + teams * (4 if defer else 2) * (rows * 2 * lora_b_stride(r) + 8)


def layout_end(teams, ring, red, lora, base=RESERVED):
    """SmemLayout's end: the table 64 KiB-aligned, the rings split around it, the teams' reductions
    and the LoRA staging in the gap before it where they fit; the split that ends soonest."""
    warps = teams * 8
    table = (-base) & 0xFFFF
    after = table + 65536

    def place(before):
        end, gap = after + (warps - before) * ring, before * ring
        for size in (teams * red, lora):
            if gap + size <= table:
                gap += size
            else:
                end += size
        return end

    most = min(table // ring, warps)
    return min(place(b) for b in range(most + 1))


def shared_bytes(rows, m, r, staged, defer, nested=True):
    R = rows // 16
    slots, teams, nt = (4, 2, 1 if m <= 8 else 2) if R == 1 else (2, 1, 1 if m <= 8 else 2)
    lora = lora_bytes(rows, m, r, defer, teams) if staged else 0
    return layout_end(teams, slots * R * tile_bytes(nested), red_bytes(rows, nt, defer), lora)


def config(rows, m, r, limit, nested=True):
    """'S'/'g' (LoRA staged or from global memory) + 'd'/'b' (deferred sums or barriers), as nf4_gemv.cu picks."""
    staged = shared_bytes(rows, m, r, True, False, nested) <= limit
    deferred = shared_bytes(rows, m, r, staged, True, nested) <= limit
    return ("S" if staged else "g") + ("d" if deferred else "b")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=232448)
    ap.add_argument("--plain-absmax", action="store_true", help="without double quantization")
    args = ap.parse_args()
    ranks, tokens = (8, 16, 32, 64, 128, 256), (1, 8, 9, 16)
    for rows in (16, 32):
        print(f"\n{rows}-row steps | " + " | ".join(f"r = {r}" for r in ranks))
        for m in tokens:
            cells = []
            for r in ranks:
                need = shared_bytes(rows, m, r, True, False, not args.plain_absmax)
                cells.append(f"{config(rows, m, r, args.limit, not args.plain_absmax)} {(args.limit - need) / 1024:+.1f}")
            print(f"{m:2d} tokens | " + " | ".join(cells))
    print("\n(cell: configuration, then KiB left with the LoRA term staged, sums not deferred)")


if __name__ == "__main__":
    main()
