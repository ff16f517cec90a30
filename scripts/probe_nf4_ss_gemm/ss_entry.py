"""What the probe's checks share without a lora_fused build: bitsandbytes' NF4 code table
(lora_fused.nf4.NF4_LEVELS, copied), the C entry of a build (entry.cu) through ctypes, and a random NF4
weight in the kernel's input format."""
import ctypes

LEVELS = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
          -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
          0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
          0.7229568362236023, 1.0]


def load_entry(path):
    """The build's nf4_ss_gemm(mode, trans, m, n, k, act, packed, scales, scales_ld, lora_w, r, lora_act, y, stream)."""
    lib = ctypes.CDLL(path)
    lib.nf4_ss_gemm.argtypes = ([ctypes.c_int] * 5 + [ctypes.c_void_p] * 3 + [ctypes.c_longlong, ctypes.c_void_p, ctypes.c_int]
                                + [ctypes.c_void_p] * 3)
    return lib.nf4_ss_gemm


def ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def random_weight(n, k):
    """Random codes and bf16 scales of W [n, k] (k % 64 == 0): (packed [n, k / 2] uint8, element 2j in the
    high nibble; scales [k / 64, ld] bf16, zero past n; ld; W as the bf16 products level x scale, exactly)."""
    import torch

    codes = torch.randint(0, 16, (n, k), device="cuda")
    packed = ((codes[:, 0::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()
    ld = (n + 7) // 8 * 8
    scales = torch.zeros(k // 64, ld, device="cuda", dtype=torch.bfloat16)
    scales[:, :n] = ((torch.rand(k // 64, n, device="cuda") + 0.5) * k**-0.5).to(torch.bfloat16)
    lv = torch.tensor(LEVELS, device="cuda").to(torch.bfloat16)
    return packed, scales, ld, lv[codes] * scales[:, :n].t().repeat_interleave(64, dim=1)
