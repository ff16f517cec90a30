"""Checks without a GPU of nf4_ss_gemm.cu's logic, transcribed from the kernel (update it with the
kernel): (1) the index logic, emulated per CTA, k-tile and decode thread in float64 numpy (which
bytes of the TMA code and scale boxes each thread reads, with TMA's zero fill past the tensors; which
LoRA element; where each lands; every A element written once per k-tile; ragged M, N, K; forward,
backward, LoRA, bias) against x W^T / dY W; (2) the mbarrier protocol under random interleavings of
the four decode warps (warp 0's thread issues the TMA loads) and the two MMA warpgroups: the ring
of code tiles (w_full: 1 + TMA bytes, w_empty: 128 arrivals; loaded kLookahead k-tiles ahead) and
the stages (full_a: 128 arrivals, full_b: 1 + TMA bytes, empty: 256 arrivals): no deadlock, no code
slot refilled before all its readers are done, and every slot or stage read holds the k-tile
expected. The shared-memory addresses are check_layouts.cu's.

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
    scales = absmax.reshape(n, k // 64).T  # [k / 64, n], as nf4_group_scales makes them
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
                                # The thread's byte 32 t + b of the code box and its scale, zero past
                                # the tensors (TMA's fill): forward box (128 rows, 32 bytes) at rows
                                # 128 tile_f, bytes 32 kt, scale box (1 group, 128 rows) at (kt,
                                # 128 tile_f), index t; backward code box (64 rows, 64 bytes) at rows
                                # 64 kt, bytes 64 tile_f, scale box (2, 64) at (2 tile_f, 64 kt),
                                # index 64 (t % 2) + t / 2.
                                bb = 32 * t + (8 * c + e) // 2
                                br, bc = (64 * kt + bb // 64, 64 * tile_f + bb % 64) if trans else (tile_f * kBM + bb // 32, 32 * kt + bb % 32)
                                byte = packed[br * (k // 2) + bc] if br < n and bc < k // 2 else 0
                                code = (byte >> 4) if (8 * c + e) % 2 == 0 else (byte & 15)
                                sidx = 64 * (t % 2) + t // 2 if trans else t
                                sg, sr = (2 * tile_f + sidx // 64, 64 * kt + sidx % 64) if trans else (kt, tile_f * kBM + sidx)
                                scale = scales[sg, sr] if sg < k // 64 and sr < n else 0.0
                                v = LV[code] * scale if kt < k_tiles_w else 0.0
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

K_WSTAGES, LOOKAHEAD = 6, 4


def simulate_pipeline(k_tiles, seed):
    """One CTA (one tile): 4 decode warps (warp 0 holds the thread that issues TMA), 2 MMA warpgroups."""
    rnd = random.Random(seed)
    full_a = [Bar(128) for _ in range(K_STAGES)]
    full_b = [Bar(1) for _ in range(K_STAGES)]
    empty = [Bar(256) for _ in range(K_STAGES)]
    w_full = [Bar(1) for _ in range(K_WSTAGES)]
    w_empty = [Bar(128) for _ in range(K_WSTAGES)]
    a_tag = [dict() for _ in range(K_STAGES)]  # warp -> k-tile it wrote into the stage
    b_tag, w_tag = [None] * K_STAGES, [None] * K_WSTAGES
    w_reads = [0] * K_WSTAGES  # warps that have read the slot's current k-tile

    def issue_w(j):  # warp 0's thread; False: blocked on w_empty
        if j >= k_tiles:
            return True
        ws = j % K_WSTAGES
        if not w_empty[ws].done(((j // K_WSTAGES) & 1) ^ 1):
            return False
        assert w_tag[ws] is None or w_reads[ws] == 4, "code slot refilled before its readers are done"
        w_tag[ws], w_reads[ws] = j, 0
        w_full[ws].arrive()  # the TMA bytes land
        return True

    for j in range(LOOKAHEAD):
        assert issue_w(j)
    warps = [{"kt": 0, "st": "issue" if w == 0 else "wfull"} for w in range(4)]
    cons = [0, 0]
    steps = 0
    while any(w["kt"] < k_tiles for w in warps) or any(c < k_tiles for c in cons):
        steps += 1
        assert steps < 200000, "deadlock"
        who = rnd.randrange(6)
        if who < 4:
            w = warps[who]
            kt = w["kt"]
            if kt >= k_tiles:
                continue
            s, ph, ws = kt % K_STAGES, (kt // K_STAGES) & 1, kt % K_WSTAGES
            if w["st"] == "issue":
                if issue_w(kt + LOOKAHEAD):
                    w["st"] = "wfull"
            elif w["st"] == "wfull":
                if w_full[ws].done((kt // K_WSTAGES) & 1):
                    assert w_tag[ws] == kt, (w_tag[ws], kt)
                    w_reads[ws] += 1
                    w_empty[ws].arrive(32)
                    w["st"] = "empty"
            elif w["st"] == "empty":
                if empty[s].done(ph ^ 1):
                    if who == 0:
                        b_tag[s] = kt
                        full_b[s].arrive()
                    a_tag[s][who] = kt
                    full_a[s].arrive(32)
                    w["kt"] += 1
                    w["st"] = "issue" if who == 0 else "wfull"
        else:
            c = who - 4
            it = cons[c]
            if it >= k_tiles:
                continue
            s, ph = it % K_STAGES, (it // K_STAGES) & 1
            if full_a[s].done(ph) and full_b[s].done(ph):
                assert b_tag[s] == it and all(a_tag[s].get(w) == it for w in range(4)), (b_tag[s], a_tag[s], it)
                if it > 0:
                    empty[(it - 1) % K_STAGES].arrive(128)
                cons[c] += 1
    return True

def main():
    rng = np.random.default_rng(0)
    for args in [(3, 136, 192, 0, 0, 1), (3, 136, 192, 1, 0, 0), (5, 200, 128, 0, 16, 1), (5, 200, 128, 1, 16, 0),
                 (300, 40, 64, 0, 72, 0), (2, 72, 320, 1, 72, 0)]:
        emulate_indices(*args, rng)
    for kt in (1, 2, 3, 4, 5, 6, 7, 11, 66):
        for seed in range(40):
            simulate_pipeline(kt, seed)
    print("index logic and pipeline protocol ok")


if __name__ == "__main__":
    main()
