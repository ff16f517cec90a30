"""The decode ring's chunk swizzle (csrc/cuda/nf4_gemv_blockaligned.cu, chunk_offset) checked on the
host: the copies' offsets (dst[i % 2] + 4 rows * i) land where chunk_offset says, a slot's 2 KiB are
written once, and the bank conflicts of the 16-byte copies (served a quarter-warp at a time) and of the
8-byte weight reads (a half-warp at a time), beside the earlier key row & 7 (rows 2i and 2i + 1 on the
same 8 banks: 2-way reads).

    python scripts/check_ring_swizzle.py
"""

ROW_BYTES = 128


def chunk_offset(r, c, key):
    return ROW_BYTES * r + 16 * (c ^ key(r))


def ways(accesses):
    """Most distinct 4-byte words one bank serves for these (address, bytes) accesses."""
    banks = {}
    for a, n in accesses:
        for w in range(a // 4, (a + n) // 4):
            banks.setdefault(w % 32, set()).add(w)
    return max(len(v) for v in banks.values())


def check(key):
    def dst(lane, i):
        base = chunk_offset(lane >> 3, lane & 7, key) if i % 2 == 0 else chunk_offset((lane >> 3) + 4, lane & 7, key) - 4 * ROW_BYTES
        return base + 4 * ROW_BYTES * i

    assert all(dst(lane, i) == chunk_offset((lane >> 3) + 4 * i, lane & 7, key) for lane in range(32) for i in range(4))
    assert sorted(dst(lane, i) for lane in range(32) for i in range(4)) == list(range(0, 16 * ROW_BYTES, 16))
    copy = max(ways([(dst(lane, i), 16) for lane in range(8 * q, 8 * q + 8)]) for i in range(4) for q in range(4))
    # Lane (g, t), piece p: 8 bytes of rows g and g + 8 at chunk 2p + t / 2, half t % 2.
    read = max(ways([(chunk_offset(lane >> 2, 2 * p + ((lane & 3) >> 1), key) + 8 * (lane & 1) + 8 * ROW_BYTES * h, 8)
                     for lane in range(16 * half, 16 * half + 16)])
               for p in range(4) for h in range(2) for half in range(2))
    return copy, read


if __name__ == "__main__":
    keys = {"2 (row & 3) (the kernel's)": lambda r: 2 * (r & 3), "row & 7 (before session 27)": lambda r: r & 7}
    for name, key in keys.items():
        copy, read = check(key)
        print(f"{name}: copies consistent; 16-byte copies {copy}-way, 8-byte reads {read}-way a half-warp")
    assert check(keys["2 (row & 3) (the kernel's)"]) == (1, 1)
