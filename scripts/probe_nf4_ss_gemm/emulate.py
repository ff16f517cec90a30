"""Checks without a GPU of nf4_ss_gemm.cu's logic, transcribed from the kernel (update it with the
kernel): (1) the index logic, emulated per CTA, k-tile and decode thread in float64 numpy (which
bytes of the TMA code and scale boxes each thread reads, with TMA's zero fill past the tensors; which
LoRA element; where each lands; every A element written once per k-tile; ragged M, N, K; forward,
backward, LoRA, bias; each CTA of the pair its half; split reductions: each split's k-tiles, every
k-tile in exactly one, the LoRA ones in the last, the partials added in order) against x W^T / dY W; (2) the mbarrier protocol
of a CTA pair under random interleavings of each CTA's four decode warps (warp 0's thread issues the
TMA loads; each warp's lane 0 sends the warp's 2 KiB to the peer), its two MMA warpgroups and the
copies' landing: the ring of code tiles (w_full: 1 + TMA bytes, w_empty: 128 arrivals; loaded
kLookahead k-tiles ahead) and the stages (full_a: 4 arrivals + the peer's 4 x 2 KiB, full_b: 1 + TMA bytes, empty: 16
arrivals, a warp of either CTA each): no deadlock, no code slot or stage refilled before all its
readers (of both CTAs) are done, every slot or stage read holds the k-tile expected, and (with
EPILOGUE_OVER = "A") that staging the epilogue over the A stages would race the CTA's last copies. The
shared-memory addresses are check_layouts.cu's.

    python scripts/probe_nf4_ss_gemm/emulate.py
"""
import random

import numpy as np

from ss_entry import LEVELS

LV = np.array(LEVELS)
kBM, kBN, kBK = 128, 256, 64


def emulate_indices(m, n, k, trans, r, bias_on, rng, splits=1):
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
        ats = []
        for kt in range(k_tiles):
            # The A tile as the CTA pair makes it: each rank its half, thread t 32 elements.
            At = np.full((kBM, kBK), np.nan)
            for rank in range(2):
                for t in range(128):
                    fi, bj = 64 * rank + t // 2, 32 * rank + t // 4
                    for q in range(4):
                        for e in range(8):
                            p = 8 * q + e  # the element among the thread's 32
                            i, j = (32 * (t % 4) + p, bj) if trans else (fi, 32 * (t % 2) + p)
                            if r and kt >= k_tiles_w:
                                j0 = (kt - k_tiles_w) * kBK
                                lr, lc = (j0 + bj, tile_f * kBM + 32 * (t % 4)) if trans else (tile_f * kBM + fi, j0 + 32 * (t % 2))
                                rows, cols, ld = (r, k, k) if trans else (n, r, r)
                                v = 0.0
                                if lr < rows and lc + 8 * q < cols:
                                    v = lw.reshape(-1)[lr * ld + lc + p]
                            else:
                                # Byte 16 t + p / 2 of the rank's code box and its scale, zero past the
                                # tensors (TMA's fill): forward code box (64 rows, 32 bytes) at rows
                                # 128 tile_f + 64 rank, bytes 32 kt, scale box (1 group, 64 rows) at (kt,
                                # 128 tile_f + 64 rank), index t / 2; backward code box (32 rows, 64
                                # bytes) at rows 64 kt + 32 rank, bytes 64 tile_f, scale box (2, 32) at
                                # (2 tile_f, 64 kt + 32 rank), index 32 ((t % 4) / 2) + t / 4.
                                bb = 16 * t + p // 2
                                br, bc = ((64 * kt + 32 * rank + bb // 64, 64 * tile_f + bb % 64) if trans
                                          else (tile_f * kBM + 64 * rank + bb // 32, 32 * kt + bb % 32))
                                byte = packed[br * (k // 2) + bc] if br < n and bc < k // 2 else 0
                                code = (byte >> 4) if p % 2 == 0 else (byte & 15)
                                sidx = 32 * ((t % 4) // 2) + t // 4 if trans else t // 2
                                sg, sr = ((2 * tile_f + sidx // 32, 64 * kt + 32 * rank + sidx % 32) if trans
                                          else (kt, tile_f * kBM + 64 * rank + sidx))
                                scale = scales[sg, sr] if sg < k // 64 and sr < n else 0.0
                                v = LV[code] * scale if kt < k_tiles_w else 0.0
                            assert np.isnan(At[i, j]), "written twice"
                            At[i, j] = v
            assert not np.isnan(At).any(), "unwritten A"
            ats.append(At)
        # Split s's k-tiles, as the kernel takes them: at least one each, the LoRA k-tiles in the last.
        ranges = []
        for sp in range(splits):
            begin = sp * k_tiles_w // splits
            end = k_tiles if sp == splits - 1 else (sp + 1) * k_tiles_w // splits
            assert end > begin, "a split without k-tiles"
            ranges.append(range(begin, end))
        assert sorted(kt for rg in ranges for kt in rg) == list(range(k_tiles)), "k-tiles not covered once each"
        for tile_m in range(-(-m // kBN)):
            parts = []
            for rg in ranges:
                parts.append(emulate_mma(rg, ats, act, lact, r, k_tiles_w, tile_m, m))
            acc = np.zeros((kBM, kBN))
            for part in parts:  # the reduce kernel: split 0, then 1, ... (bias after, as the epilogue's)
                acc += part
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
    print(f"m={m} n={n} k={k} trans={trans} r={r} bias={bias_on} splits={splits}: max rel err {err:.2e}")
    assert err < 1e-12


def emulate_mma(k_range, ats, act, lact, r, k_tiles_w, tile_m, m):
    """One CTA's accumulators over its k-tiles: the A tiles times the activation (or u / du) tiles."""
    acc = np.zeros((kBM, kBN))
    for kt in k_range:
        Bt = np.zeros((kBN, kBK))
        src, kk = (act, kt) if not (r and kt >= k_tiles_w) else (lact, kt - k_tiles_w)
        for mm in range(kBN):
            tok = tile_m * kBN + mm
            for jj in range(kBK):
                col = kk * kBK + jj
                if tok < m and col < src.shape[1]:
                    Bt[mm, jj] = src[tok, col]
        acc += ats[kt] @ Bt.T
    return acc


K_STAGES = 4


class Bar:
    """An mbarrier: pending arrivals and a transaction count (which may dip below zero within a phase)."""
    def __init__(self, count):
        self.count, self.pending, self.tx, self.phase = count, count, 0, 0  # phase = completed phases so far
    def _check(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.count
    def arrive(self, n=1, expect_tx=0):
        self.pending -= n
        self.tx += expect_tx
        assert self.pending >= 0
        self._check()
    def complete_tx(self, nbytes):
        self.tx -= nbytes
        assert self.pending > 0 or self.tx >= 0, "bytes landed in a finished phase"
        self._check()
    def done(self, parity):  # try_wait.parity: has the phase with this parity completed (the current one-before)?
        # completed phases: 0..self.phase-1; waiting on parity p passes if the most recent completed phase has parity p,
        # or for a fresh barrier, parity 1 (the "phase -1")
        last = self.phase - 1
        return (last % 2) == parity if last >= 0 else parity == 1


K_WSTAGES, LOOKAHEAD = 6, 4
EPILOGUE_OVER = "B"  # the stages the epilogue stages its tile over: "A" would overwrite copies' sources


def simulate_pipeline(k_tiles, seed):
    """A cluster of two CTAs, each: 4 decode warps (warp 0 holds the thread that issues TMA; each
    warp copies its part to the peer), 2 MMA warpgroups (8 warps; one arrival per warp on both CTAs'
    `empty`); the bulk copies land at random later steps."""
    rnd = random.Random(seed)
    ctas = []
    for c in range(2):
        ctas.append({
            "full_a": [Bar(4) for _ in range(K_STAGES)], "full_b": [Bar(1) for _ in range(K_STAGES)],
            "empty": [Bar(16) for _ in range(K_STAGES)],
            "w_full": [Bar(1) for _ in range(K_WSTAGES)], "w_empty": [Bar(128) for _ in range(K_WSTAGES)],
            "part": [[None] * 8 for _ in range(K_STAGES)],  # k-tile in each 2 KiB part (4 rank + warp) of each stage
            "b_tag": [None] * K_STAGES, "w_tag": [None] * K_WSTAGES, "w_reads": [0] * K_WSTAGES,
            "warps": [{"kt": 0, "st": "issue" if w == 0 else "wfull", "wrote": 0} for w in range(4)],
            "cons": [0, 0], "released": [-1, -1],
        })
    copies = []  # (destination CTA, stage, part, k-tile)

    def issue_w(C, j):
        if j >= k_tiles:
            return True
        ws = j % K_WSTAGES
        if not C["w_empty"][ws].done(((j // K_WSTAGES) & 1) ^ 1):
            return False
        assert C["w_tag"][ws] is None or C["w_reads"][ws] == 4, "code slot refilled before its readers are done"
        C["w_tag"][ws], C["w_reads"][ws] = j, 0
        C["w_full"][ws].arrive()
        return True

    for C in ctas:
        for j in range(LOOKAHEAD):
            assert issue_w(C, j)
    steps = 0
    while (any(w["kt"] < k_tiles for C in ctas for w in C["warps"]) or any(x < k_tiles for C in ctas for x in C["cons"])
           or copies):
        steps += 1
        assert steps < 400000, "deadlock"
        c = rnd.randrange(2)
        C, P = ctas[c], ctas[c ^ 1]
        who = rnd.randrange(7)
        if who == 6:
            if copies:
                dst, s, part, kt, _ = copies.pop(rnd.randrange(len(copies)))
                D = ctas[dst]
                D["part"][s][part] = kt
                D["full_a"][s].complete_tx(2048)
        elif who < 4:
            w = C["warps"][who]
            kt = w["kt"]
            if kt >= k_tiles:
                continue
            s, ph, ws = kt % K_STAGES, (kt // K_STAGES) & 1, kt % K_WSTAGES
            if w["st"] == "issue":
                if issue_w(C, kt + LOOKAHEAD):
                    w["st"] = "wfull"
            elif w["st"] == "wfull":
                if C["w_full"][ws].done((kt // K_WSTAGES) & 1):
                    assert C["w_tag"][ws] == kt, (C["w_tag"][ws], kt)
                    C["w_reads"][ws] += 1
                    C["w_empty"][ws].arrive(32)
                    w["st"] = "empty"
            elif w["st"] == "empty":
                if C["empty"][s].done(ph ^ 1):
                    # The stage's previous k-tile is read by every MMA warpgroup of both CTAs.
                    assert kt < K_STAGES or all(min(X["released"]) >= kt - K_STAGES for X in ctas), "stage refilled early"
                    if who == 0:
                        C["b_tag"][s] = kt
                        C["full_b"][s].arrive()
                    # The warp's 2 KiB written, fenced, __syncwarp: its lane 0 arrives and sends them.
                    C["part"][s][4 * c + who] = kt
                    C["full_a"][s].arrive(1, expect_tx=2048)
                    copies.append((c ^ 1, s, 4 * c + who, kt, c))
                    w["kt"] += 1
                    w["st"] = "issue" if who == 0 else "wfull"
        else:
            g = who - 4
            it = C["cons"][g]
            if it >= k_tiles:
                continue
            s, ph = it % K_STAGES, (it // K_STAGES) & 1
            if C["full_a"][s].done(ph) and C["full_b"][s].done(ph):
                assert C["b_tag"][s] == it and C["part"][s] == [it] * 8, (C["b_tag"][s], C["part"][s], it)
                if it > 0:
                    C["released"][g] = it - 1
                    C["empty"][(it - 1) % K_STAGES].arrive(4)
                    P["empty"][(it - 1) % K_STAGES].arrive(4)
                C["cons"][g] += 1
                if min(C["cons"]) == k_tiles and EPILOGUE_OVER == "A":  # the epilogue begins
                    # The CTA's own copies read its A stages until they land (on the peer's barrier).
                    assert not any(cp[4] == c for cp in copies), "the epilogue overwrites a copy's source"
    return True


def main():
    rng = np.random.default_rng(0)
    for args in [(3, 136, 192, 0, 0, 1), (3, 136, 192, 1, 0, 0), (5, 200, 128, 0, 16, 1), (5, 200, 128, 1, 16, 0),
                 (300, 40, 64, 0, 72, 0), (2, 72, 320, 1, 72, 0)]:
        emulate_indices(*args, rng)
    for args in [(3, 136, 192, 0, 0, 1, 2), (5, 200, 128, 1, 16, 0, 2), (300, 40, 320, 0, 72, 1, 5), (2, 72, 320, 1, 72, 0, 2)]:
        emulate_indices(*args[:6], rng, splits=args[6])
    for kt in (1, 2, 3, 4, 5, 6, 7, 11, 66):
        for seed in range(40):
            simulate_pipeline(kt, seed)
    print("index logic and pipeline protocol ok")


if __name__ == "__main__":
    main()
