"""Checks without a GPU of nf4_ss_gemm.cu's logic, transcribed from the kernel (update it with the
kernel): (1) the index logic, emulated per CTA, k-tile and decode thread in float64 numpy (which W
element, scale, LoRA element each thread writes where; every A element written once per k-tile;
ragged M, N, K; forward, backward, LoRA, bias) against x W^T / dY W; (2) the mbarrier protocol
(full_a: 128 arrivals, full_b: 1 + TMA bytes, empty: 256 arrivals; the release of a tile's last
stage; the persistent grid's tile loop) under random interleavings: no deadlock, and every stage
the MMA warps read holds the k-tile they expect. The shared-memory addresses are check_layouts.cu's.

    python scripts/probe_nf4_ss_gemm/emulate.py   (lora_fused importable: its NF4 code table)
"""
import random

import numpy as np

from lora_fused.nf4 import NF4_LEVELS

LV = np.array(NF4_LEVELS)
kBM, kBN, kBK = 128, 256, 64


def emulate_indices(m, n, k, trans, r, bias_on, rng):
    codes = rng.integers(0, 16, size=(n, k))
    flat = codes.reshape(-1)
    packed = ((flat[0::2] << 4) | flat[1::2]).astype(np.uint8)  # element 2j high nibble
    absmax = rng.random(n * k // 64) + 0.5
    W = LV[codes] * np.repeat(absmax, 64).reshape(n, k)
    features, reduction = (k, n) if trans else (n, k)
    act = rng.standard_normal((m, reduction))
    A = rng.standard_normal((r, k)) if r else None
    B = rng.standard_normal((n, r)) if r else None
    lact = rng.standard_normal((m, r)) if r else None  # u or du
    lw = (A if trans else B)
    bias = rng.standard_normal(n) if bias_on and not trans else None
    y = np.full((m, features), np.nan)
    k_tiles_w = -(-reduction // kBK)
    k_tiles = k_tiles_w + (-(-r // kBK) if r else 0)
    for tile_f in range(-(-features // kBM)):
        for tile_m in range(-(-m // kBN)):
            acc = np.zeros((kBM, kBN))
            for kt in range(k_tiles):
                At = np.full((kBM, kBK), np.nan)
                for t in range(128):
                    row = t // 2 if trans else tile_f * kBM + t
                    col0 = tile_f * kBM + 64 * (t % 2) if trans else 0
                    row_step, col_step = (kBK, 0) if trans else (0, kBK)
                    for c in range(8):
                        for e in range(8):
                            # where the kernel's store for (t, c, e) lands (checked against CuTe)
                            i, j = (64 * (t % 2) + 8 * c + e, t // 2) if trans else (t, 8 * c + e)
                            if r and kt >= k_tiles_w:
                                j0 = (kt - k_tiles_w) * kBK
                                lr = j0 + t // 2 if trans else tile_f * kBM + t
                                lc = col0 if trans else j0
                                rows, cols, ld = (r, k, k) if trans else (n, r, r)
                                v = 0.0
                                if lr < rows and lc + 8 * c < cols:
                                    v = lw.reshape(-1)[lr * ld + lc + 8 * c + e]
                            else:
                                wr, wc = row + row_step * kt, col0 + col_step * kt
                                v = 0.0
                                if kt < k_tiles_w and wr < n and wc < k:
                                    el = wr * k + wc
                                    byte = packed[el // 2 + (8 * c + e) // 2]
                                    code = (byte >> 4) if (8 * c + e) % 2 == 0 else (byte & 15)
                                    v = LV[code] * absmax[el // 64]
                                else:
                                    v = LV[0] * 0.0
                            assert np.isnan(At[i, j]), "written twice"
                            At[i, j] = v
                assert not np.isnan(At).any(), "unwritten A"
                Bt = np.zeros((kBN, kBK))
                src, kk = (act, kt) if not (r and kt >= k_tiles_w) else (lact, kt - k_tiles_w)
                for mm in range(kBN):
                    tok = tile_m * kBN + mm
                    for jj in range(kBK):
                        col = kk * kBK + jj
                        if tok < m and col < src.shape[1]:
                            Bt[mm, jj] = src[tok, col]
                acc += At @ Bt.T
            for i in range(kBM):
                for mm in range(kBN):
                    f, tok = tile_f * kBM + i, tile_m * kBN + mm
                    if f < features and tok < m:
                        y[tok, f] = acc[i, mm] + (bias[f] if bias is not None else 0)
    ref = act @ (W if trans else W.T)
    if r:
        ref += lact @ (A if trans else B.T)
    if bias is not None:
        ref += bias
    assert not np.isnan(y).any()
    err = np.abs(y - ref).max() / np.abs(ref).max()
    print(f"m={m} n={n} k={k} trans={trans} r={r} bias={bias_on}: max rel err {err:.2e}")
    assert err < 1e-12


K_STAGES = 4


class Bar:
    def __init__(self, count):
        self.count, self.pending, self.phase = count, count, 0  # phase = completed phases so far
    def arrive(self, n=1):
        self.pending -= n
        assert self.pending >= 0
        if self.pending == 0:
            self.phase += 1
            self.pending = self.count
    def done(self, parity):  # try_wait.parity: has the phase with this parity completed (the current one-before)?
        # completed phases: 0..self.phase-1; waiting on parity p passes if the most recent completed phase has parity p,
        # or for a fresh barrier, parity 1 (the "phase -1")
        last = self.phase - 1
        return (last % 2) == parity if last >= 0 else parity == 1

def simulate_pipeline(tiles, grid, k_tiles, seed):
    rnd = random.Random(seed)
    full_a = [Bar(128) for _ in range(K_STAGES)]
    full_b = [Bar(1) for _ in range(K_STAGES)]
    empty = [Bar(256) for _ in range(K_STAGES)]
    stage_tag = [None] * K_STAGES
    for cta in range(grid):
        my = list(range(cta, tiles, grid))
        work = [(t, kt) for t in my for kt in range(k_tiles)]
        # producer state
        p_it = 0
        # consumers: per WG: it, phase of op: 'wait', then 'released prev'
        cons = [{"it": 0, "pending_release": None, "done": False} for _ in range(2)]
        for b in full_a + full_b + empty:
            b.__init__(b.count)
        steps = 0
        while p_it < len(work) or not all(c["done"] for c in cons):
            steps += 1
            assert steps < 100000, "deadlock"
            who = rnd.randrange(3)
            if who == 0 and p_it < len(work):
                s, ph = p_it % K_STAGES, (p_it // K_STAGES) & 1
                if empty[s].done(ph ^ 1):
                    stage_tag[s] = work[p_it]
                    full_b[s].arrive()
                    full_a[s].arrive(128)
                    p_it += 1
            elif who > 0:
                c = cons[who - 1]
                if c["done"]:
                    continue
                it = c["it"]
                if it >= len(work):
                    # end of the last tile: release its last stage (already done in-loop below)
                    c["done"] = True
                    continue
                s, ph = it % K_STAGES, (it // K_STAGES) & 1
                if full_a[s].done(ph) and full_b[s].done(ph):
                    assert stage_tag[s] == work[it], (stage_tag[s], work[it])
                    tile, kt = work[it]
                    if kt > 0:
                        empty[(it - 1) % K_STAGES].arrive(128)
                    if kt == k_tiles - 1:
                        empty[it % K_STAGES].arrive(128)  # the tile's last stage
                    c["it"] += 1
    return True

def main():
    rng = np.random.default_rng(0)
    for args in [(3, 136, 192, 0, 0, 1), (3, 136, 192, 1, 0, 0), (5, 200, 128, 0, 16, 1), (5, 200, 128, 1, 16, 0),
                 (300, 40, 64, 0, 72, 0), (2, 72, 320, 1, 72, 0)]:
        emulate_indices(*args, rng)
    for tiles, grid, kt in [(1, 1, 1), (1, 1, 7), (5, 5, 3), (10, 3, 5), (7, 2, 1), (9, 4, 66), (3, 1, 4), (6, 2, 2)]:
        for seed in range(30):
            simulate_pipeline(tiles, grid, kt, seed)
    print("index logic and pipeline protocol ok")


if __name__ == "__main__":
    main()
