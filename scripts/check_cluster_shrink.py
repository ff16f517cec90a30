"""The in-kernel LoRA shrink's work split (csrc/cuda/lora_shrink_cluster.cuh, ClusterShrink and
cluster_shrink_finish) replayed on the host: each block of a cluster takes its share of K's 32-column
chunks, its warps walk work lanes (rank tile, group of chunks) in batches, a batch's chunks past the
slice multiply by zero, every lane's sums land in scratch [groups][m][r] (none left unwritten), and the
groups' and then the cluster's sums equal x @ A^T. Over tokens 1-16, ranks 8-128, K 256-14336,
clusters of 1-8 blocks and both block shapes (16 warps with batches of 2, 8 warps with batches of 4).

    python scripts/check_cluster_shrink.py
"""

import itertools

import numpy as np


def shrink(x, a, size, warps, batch):
    m, k = x.shape
    r = a.shape[0]
    chunks, tiles = k // 32, r // 8
    groups = max(1, warps // tiles)
    lanes = groups * tiles
    per = -(-chunks // size)
    u = np.zeros((m, r))
    for rank in range(size):  # the cluster's blocks, added in rank order
        c0 = min(chunks, rank * per)
        c1 = min(chunks, c0 + per)
        scratch = np.full((groups, m, r), np.nan)
        for warp in range(warps):
            wl, i0, c = warp, 0, np.zeros((16, 8))
            while wl < lanes:
                tile, group = wl % tiles, wl // tiles
                for i in range(batch):
                    ch = c0 + group + groups * (i0 + i)
                    col = 32 * (ch if ch < c1 else c0)
                    xs = x[[t if t < m else 0 for t in range(16)], col:col + 32]  # tokens past m read token 0
                    c += xs @ (a[8 * tile:8 * tile + 8, col:col + 32] * (ch < c1)).T
                i0 += batch
                if c0 + group + groups * i0 >= c1:
                    scratch[group, :, 8 * tile:8 * tile + 8] = c[:m]
                    wl, i0, c = wl + warps, 0, np.zeros((16, 8))
        assert not np.isnan(scratch).any(), "a work lane left its sums unwritten"
        u += scratch.sum(0)
    return u


def main():
    rng = np.random.default_rng(0)
    cases = 0
    for m, r, k, size, (warps, batch) in itertools.product([1, 7, 9, 16], [8, 16, 24, 64, 128], [256, 2304, 4096, 14336],
                                                           [1, 2, 4, 8], [(16, 2), (8, 4)]):
        x, a = rng.standard_normal((m, k)), rng.standard_normal((r, k))
        err = np.abs(shrink(x, a, size, warps, batch) - x @ a.T).max()
        assert err < 1e-9 * k, (m, r, k, size, warps, err)
        cases += 1
    print(f"check_cluster_shrink: {cases} cases, every product counted once")


if __name__ == "__main__":
    main()
