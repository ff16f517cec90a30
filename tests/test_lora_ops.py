"""lora_shrink, lora_expand and lora_decode (with the decode kernels' shrink) against float64 references,
gradients, opcheck, bad inputs."""

import pytest
import torch

import lora_fused
from lora_fused import _ops, nf4, reference
from conftest import DEVICES, DTYPES, assert_error_rule, poison_allocator, randn, requires_cuda

SHAPES = [(1, 17, 1), (7, 64, 8), (64, 129, 16), (33, 1000, 64), (5, 255, 256), (4097, 96, 16)]


def _x(M, k, dtype, device, layout):
    if layout == "contiguous":
        return randn(M, k, dtype=dtype, device=device)
    if layout == "row_strided":  # a column slice: row stride > k
        return randn(M, k + 9, dtype=dtype, device=device)[:, 3 : 3 + k]
    return randn(k, M, dtype=dtype, device=device).t()  # transposed: inner stride != 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,k,r", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "transposed"])
def test_lora_shrink_matches_reference(device, dtype, M, k, r, layout):
    x = _x(M, k, dtype, device, layout)
    a = randn(r, k, dtype=dtype, device=device, scale=k**-0.5)
    poison_allocator(device)
    u = _ops.lora_shrink(x, a, 0.75)
    ref = reference.lora_shrink(x, a, 0.75)
    assert u.dtype == dtype and u.device.type == device
    assert_error_rule(u, ref, 0.75 * (x @ a.t()), f"lora_shrink {M}x{k} r={r} {dtype} {layout}")


# Shapes for the CUDA tensor-core kernel (bf16/fp16, k % 8 == 0): k split over blocks (few rows, long
# k) and not (many rows or short k), rank tails within a 16/32/64-rank tile and over several tiles,
# k tails within a 64-column tile, row tails within a 64-row block.
TC_SHAPES = [(1, 4096, 1), (3, 4096, 16), (64, 2048, 32), (130, 1024, 33), (70, 2048, 200), (777, 520, 8),
             (4500, 4096, 16), (100, 8, 64)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,k,r", TC_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "row_strided", "a_transposed"])
def test_lora_shrink_tensor_core_shapes(device, dtype, M, k, r, layout):
    x = _x(M, k, dtype, device, "row_strided" if layout == "row_strided" else "contiguous")
    if layout == "a_transposed":  # as the backward passes B^T: [r, d] with strides (1, r)
        a = randn(k, r, dtype=dtype, device=device, scale=k**-0.5).t()
    else:
        a = randn(r, k, dtype=dtype, device=device, scale=k**-0.5)
    poison_allocator(device)
    u = _ops.lora_shrink(x, a, 0.75)
    assert_error_rule(u, reference.lora_shrink(x, a, 0.75), 0.75 * (x @ a.t()), f"lora_shrink {M}x{k} r={r} {dtype} {layout}")
    # The k-split partials are added in a fixed order: the same inputs give the same bits.
    assert torch.equal(u, _ops.lora_shrink(x, a, 0.75)), f"lora_shrink {M}x{k} r={r}: two calls differ"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,d,r", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "row_strided"])
def test_lora_expand_matches_reference(device, dtype, M, d, r, layout):
    y = _x(M, d, dtype, device, layout)
    u = randn(M, r, dtype=dtype, device=device)
    b = randn(d, r, dtype=dtype, device=device, scale=r**-0.5)
    poison_allocator(device)
    out = _ops.lora_expand(y, u, b, 2.0)
    ref = reference.lora_expand(y, u, b, 2.0)
    assert out.dtype == dtype and out.is_contiguous()
    assert_error_rule(out, ref, y + 2.0 * (u @ b.t()), f"lora_expand {M}x{d} r={r} {dtype} {layout}")


@pytest.mark.parametrize("device", DEVICES)
def test_strided_weight_operands(device):
    # The backward passes B^T to lora_shrink and A^T to lora_expand as views.
    x = randn(9, 40, device=device)
    a_t = randn(40, 5, device=device).t()  # [5, 40], strides (1, 5)
    assert_error_rule(_ops.lora_shrink(x, a_t), reference.lora_shrink(x, a_t), x @ a_t.t(), "strided A")
    y, u = randn(9, 40, device=device), randn(9, 5, device=device)
    b_t = randn(5, 40, device=device).t()  # [40, 5], strides (1, 40)
    assert_error_rule(_ops.lora_expand(y, u, b_t), reference.lora_expand(y, u, b_t), y + u @ b_t.t(), "strided B")


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    x = torch.randn(6, 11, dtype=torch.float64, device=device, requires_grad=True)
    a = torch.randn(3, 11, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.randn(6, 13, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(13, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: _ops.lora_shrink(x, a, 0.5), (x, a))
    u = torch.randn(6, 3, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, u, b: _ops.lora_expand(y, u, b, 1.5), (y, u, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    x = randn(5, 24, dtype=dtype, device=device).requires_grad_()
    a = randn(4, 24, dtype=dtype, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.lora_fused.lora_shrink.default, (x, a, 0.5))
    y = randn(5, 10, dtype=dtype, device=device).requires_grad_()
    u = randn(5, 4, dtype=dtype, device=device).requires_grad_()
    b = randn(10, 4, dtype=dtype, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.lora_fused.lora_expand.default, (y, u, b, 2.0))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x, a = randn(0, 8, device=device), randn(4, 8, device=device)
    assert _ops.lora_shrink(x, a).shape == (0, 4)
    assert _ops.lora_expand(randn(0, 6, device=device), randn(0, 4, device=device), randn(6, 4, device=device)).shape == (0, 6)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_give_clear_errors(device):
    x, a = randn(4, 8, device=device), randn(2, 8, device=device)
    with pytest.raises(ValueError, match="last dimensions must agree"):
        _ops.lora_shrink(x, randn(2, 9, device=device))
    with pytest.raises(ValueError, match="must have 2 dimensions"):
        _ops.lora_shrink(randn(2, 4, 8, device=device), a)
    with pytest.raises(ValueError, match="at least 1"):
        _ops.lora_shrink(x, randn(0, 8, device=device))
    with pytest.raises(TypeError, match="same dtype"):
        _ops.lora_shrink(x, a.to(torch.bfloat16))
    with pytest.raises(TypeError, match="bfloat16, float16, float32 or float64"):
        _ops.lora_shrink(x.to(torch.int32), a.to(torch.int32))
    with pytest.raises(ValueError, match=r"expected y \[M, d\], u \[M, r\], lora_B \[d, r\]"):
        _ops.lora_expand(randn(4, 6, device=device), randn(4, 2, device=device), randn(5, 2, device=device))
    if device == "cuda":
        with pytest.raises(RuntimeError, match="same device"):
            _ops.lora_shrink(x, a.cpu())
        # The context is still healthy after the errors above.
        assert torch.isfinite(_ops.lora_shrink(x, a)).all()


# On CUDA each of lora_decode's kernels is forced in turn (CUDA-core dot products, 16 or (one token) 8
# weight rows a block; tensor cores, 8, 16 or 32 rows; either with streaming hints on the weight's loads;
# on sm_90 the weight streamed by bulk copies).
_CUDA = DEVICES[1]
_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
requires_sm90 = pytest.mark.skipif(not _SM90, reason="the bulk-copy decode kernel needs an sm_90 GPU")
# lora_decode's kernels forced, by id: the environment each sets.
_DECODE_ENV = {
    "simt": {"LORA_FUSED_DECODE_KERNEL": "simt"},
    "mma": {"LORA_FUSED_DECODE_KERNEL": "mma"},
    "simt-hints": {"LORA_FUSED_DECODE_KERNEL": "simt", "LORA_FUSED_DECODE_STREAM_HINTS": "1"},
    "mma-hints": {"LORA_FUSED_DECODE_KERNEL": "mma", "LORA_FUSED_DECODE_STREAM_HINTS": "1"},
    "bulk": {"LORA_FUSED_DECODE_KERNEL": "bulk"},
}
DECODE_KERNELS = [("cpu", None)] + [
    pytest.param("cuda", kern, marks=[*_CUDA.marks, *([requires_sm90] if kern == "bulk" else [])], id=f"cuda-{kern}")
    for kern in _DECODE_ENV
]


def force_decode_kernel(monkeypatch, kernel):
    for name, value in _DECODE_ENV.get(kernel, {}).items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("device,kernel", DECODE_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 13, 16, 17])
@pytest.mark.parametrize(
    "k,d,r", [(64, 40, 1), (512, 136, 16), (1544, 33, 64), (1032, 72, 256), (100, 24, 8), (72, 16, 300), (2080, 72, 16), (9216, 40, 8)]
)
@pytest.mark.parametrize("bias", [True, False])
def test_lora_decode_matches_reference(device, kernel, dtype, M, k, d, r, bias, monkeypatch):
    # k = 100 (not a multiple of 8), r = 300 and fp32 exercise the composed fallback; the rest the
    # kernel, with u from cuBLAS where k % 32 != 0 (1544, 1032, 72) and from the shrink kernel's
    # partial sums elsewhere (2080: one slice of K, 9216: three, the last partial; with 8-warp shrink
    # blocks three and eight: test_decode_shrink_blocks_of_8_and_32_warps).
    force_decode_kernel(monkeypatch, kernel)
    x = randn(M, k, dtype=dtype, device=device)
    w = randn(d, k, dtype=dtype, device=device, scale=k**-0.5)
    a = randn(r, k, dtype=dtype, device=device, scale=k**-0.5)
    b = randn(d, r, dtype=dtype, device=device, scale=r**-0.5)
    bias_t = randn(d, dtype=dtype, device=device) if bias else None
    poison_allocator(device)
    y = _ops.lora_decode(x, w, a, b, 1.5, bias_t)
    ref = reference.lora_linear(x, w, a, b, 1.5, bias_t)
    same = x @ w.t() + 1.5 * ((x @ a.t()) @ b.t()) + (bias_t if bias else 0)
    assert_error_rule(y, ref, same, f"lora_decode M={M} {k}->{d} r={r} {dtype}")


@requires_cuda
@pytest.mark.parametrize("warps", ["8", "32"])
@pytest.mark.parametrize("M", [1, 16])
# Slices of K with 32-warp blocks (8-warp): 1 (1), 1 (3, the last partial), 1 (4), 2 (5), 3 (8), 8 (8),
# 8 (8: the most, slices longer than a batch).
@pytest.mark.parametrize("k", [32, 2080, 4096, 4096 + 32, 9216, 8 * 4096, 8 * 4096 + 32])
def test_decode_shrink_blocks_of_8_and_32_warps(warps, M, k, monkeypatch):
    # LORA_FUSED_LORA_SHRINK_WARPS: the decode kernels' shrink (x @ lora_A^T as partial sums over
    # slices of K) in blocks of 8 or 32 warps; lora_decode and the NF4 decode kernel read it.
    monkeypatch.setenv("LORA_FUSED_LORA_SHRINK_WARPS", warps)
    d, r = 264, 16
    x = randn(M, k, dtype=torch.bfloat16, device="cuda")
    w = randn(d, k, dtype=torch.bfloat16, device="cuda", scale=k**-0.5)
    a = randn(r, k, dtype=torch.bfloat16, device="cuda", scale=k**-0.5)
    b = randn(d, r, dtype=torch.bfloat16, device="cuda", scale=r**-0.5)
    poison_allocator("cuda")
    y = _ops.lora_decode(x, w, a, b, 1.5)
    assert_error_rule(y, reference.lora_linear(x, w, a, b, 1.5), x @ w.t() + 1.5 * ((x @ a.t()) @ b.t()),
                      f"lora_decode, {warps}-warp shrink, M={M} k={k}")
    if k % 256 == 0:  # the NF4 decode kernel that reads the shrink's sums (block-aligned) takes k % 256 == 0
        packed, state = nf4.quantize(w, blocksize=64)
        yq = lora_fused.qlora_linear(x, packed, state, a, b, 1.5, training=False)
        wq = nf4.dequantize(packed, state, torch.bfloat16)
        assert_error_rule(yq, reference.nf4_linear(x, packed, state, None, a, b, 1.5),
                          x @ wq.t() + 1.5 * ((x @ a.t()) @ b.t()), f"qlora decode, {warps}-warp shrink, M={M} k={k}")


@requires_cuda
@pytest.mark.parametrize("M", [2, 5, 9, 16])
@pytest.mark.parametrize("r", [12, 16, 64, 256])
@pytest.mark.parametrize("k", [2080, 9216, 1544])  # u from the shrink's 1 or 3 partial sums, or from cuBLAS
def test_decode_u_loaded_together_is_bitwise_one_by_one(M, r, k, monkeypatch):
    # LORA_FUSED_DECODE_U_TOGETHER: the tensor-core kernel loads a thread's 4 elements of u (ranks
    # r..r8 - 1 as zeros: r = 12) in one round trip, or (0) one at a time; the same sums either way.
    monkeypatch.setenv("LORA_FUSED_DECODE_KERNEL", "mma")
    d = 264
    x = randn(M, k, dtype=torch.bfloat16, device="cuda")
    w = randn(d, k, dtype=torch.bfloat16, device="cuda", scale=k**-0.5)
    a = randn(r, k, dtype=torch.bfloat16, device="cuda", scale=k**-0.5)
    b = randn(d, r, dtype=torch.bfloat16, device="cuda", scale=r**-0.5)
    bias = randn(d, dtype=torch.bfloat16, device="cuda")

    def run():
        poison_allocator("cuda")
        return _ops.lora_decode(x, w, a, b, 1.5, bias)

    monkeypatch.setenv("LORA_FUSED_DECODE_U_TOGETHER", "1")
    got = run()
    assert_error_rule(got, reference.lora_linear(x, w, a, b, 1.5, bias), x @ w.t() + 1.5 * ((x @ a.t()) @ b.t()) + bias,
                      f"lora_decode, u loaded together, M={M} k={k} r={r}")
    monkeypatch.setenv("LORA_FUSED_DECODE_U_TOGETHER", "0")
    want = run()
    assert not want.isnan().any()
    assert torch.equal(got, want), (got - want).abs().max()


@requires_cuda
@pytest.mark.parametrize("name,value,message", [("LORA_FUSED_LORA_SHRINK_WARPS", "16", "must be 8 or 32 .*got '16'"),
                                                ("LORA_FUSED_DECODE_U_TOGETHER", "yes", "must be 0 or 1, got 'yes'")])
def test_bad_decode_setting_is_a_clear_error(name, value, message, monkeypatch):
    monkeypatch.setenv(name, value)
    x, w = randn(2, 256, dtype=torch.bfloat16, device="cuda"), randn(64, 256, dtype=torch.bfloat16, device="cuda")
    a, b = randn(8, 256, dtype=torch.bfloat16, device="cuda"), randn(64, 8, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match=f"{name} {message}"):
        _ops.lora_decode(x, w, a, b, 1.0)


@requires_sm90
@pytest.mark.parametrize("rows,stages", [("16", "2"), ("16", "3"), ("16", "6"), ("32", "2"), ("32", "3"), ("32", None)])
@pytest.mark.parametrize("M", [1, 8, 9, 16])
# Stage tails (k % 512: 8, 0, 264), one stage and many; d: under a tile, a ragged last tile, and
# enough tiles that blocks walk runs of several (the ring carried across tiles).
@pytest.mark.parametrize("k,d", [(8, 33), (520, 7), (1024, 9000), (2824, 700), (9216, 1040)])
def test_lora_decode_bulk_rows_and_stages(rows, stages, M, k, d, monkeypatch):
    # The bulk-copy kernel's tiles of 16 or 32 weight rows and 2 to 6 ring stages
    # (LORA_FUSED_DECODE_ROWS, LORA_FUSED_DECODE_STAGES), fp16 with bias and a strided lora_B.
    monkeypatch.setenv("LORA_FUSED_DECODE_KERNEL", "bulk")
    monkeypatch.setenv("LORA_FUSED_DECODE_ROWS", rows)
    if stages is not None:  # else the default: as many as let two blocks share an SM
        monkeypatch.setenv("LORA_FUSED_DECODE_STAGES", stages)
    r = 24
    x = randn(M, k, dtype=torch.float16, device="cuda")
    w = randn(d, k, dtype=torch.float16, device="cuda", scale=k**-0.5)
    a = randn(r, k, dtype=torch.float16, device="cuda", scale=k**-0.5)
    b = randn(r, d, dtype=torch.float16, device="cuda", scale=r**-0.5).t()
    bias = randn(d, dtype=torch.float16, device="cuda")
    poison_allocator("cuda")
    y = _ops.lora_decode(x, w, a, b, 0.5, bias)
    assert_error_rule(y, reference.lora_linear(x, w, a, b, 0.5, bias), x @ w.t() + 0.5 * ((x @ a.t()) @ b.t()) + bias,
                      f"lora_decode bulk rows={rows} stages={stages} M={M} {k}->{d}")


@requires_cuda
@pytest.mark.parametrize("M", [1, 5, 16])
def test_lora_decode_weight_larger_than_l2(M):
    # The default dispatch streams a weight larger than the GPU's L2 with hinted loads (the tensor-core
    # kernel, one token included); d is odd so the last block is partial.
    k = 4096
    d = torch.cuda.get_device_properties(0).L2_cache_size // (2 * k) + 9
    x = randn(M, k, dtype=torch.bfloat16, device="cuda")
    w = randn(d, k, dtype=torch.bfloat16, device="cuda", scale=k**-0.5)
    a = randn(16, k, dtype=torch.bfloat16, device="cuda", scale=k**-0.5)
    b = randn(d, 16, dtype=torch.bfloat16, device="cuda", scale=0.25)
    bias = randn(d, dtype=torch.bfloat16, device="cuda")
    poison_allocator("cuda")
    y = _ops.lora_decode(x, w, a, b, 2.0, bias)
    assert_error_rule(y, reference.lora_linear(x, w, a, b, 2.0, bias), x @ w.t() + 2.0 * ((x @ a.t()) @ b.t()) + bias,
                      f"lora_decode M={M} {k}->{d}, weight larger than L2")


@requires_cuda
def test_bad_decode_kernel_settings_are_clear_errors(monkeypatch):
    x, w = randn(2, 256, dtype=torch.bfloat16, device="cuda"), randn(64, 256, dtype=torch.bfloat16, device="cuda")
    a, b = randn(8, 256, dtype=torch.bfloat16, device="cuda"), randn(64, 8, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setenv("LORA_FUSED_DECODE_KERNEL", "simt")
    monkeypatch.setenv("LORA_FUSED_DECODE_STREAM_HINTS", "yes")
    with pytest.raises(RuntimeError, match="LORA_FUSED_DECODE_STREAM_HINTS must be 0 or 1, got 'yes'"):
        _ops.lora_decode(x[:1], w, a, b, 1.0)
    monkeypatch.delenv("LORA_FUSED_DECODE_STREAM_HINTS")
    monkeypatch.setenv("LORA_FUSED_DECODE_KERNEL", "fast")
    with pytest.raises(RuntimeError, match="LORA_FUSED_DECODE_KERNEL must be simt, mma or bulk; got 'fast'"):
        _ops.lora_decode(x, w, a, b, 1.0)
    if not _SM90:
        monkeypatch.setenv("LORA_FUSED_DECODE_KERNEL", "bulk")
        with pytest.raises(RuntimeError, match="LORA_FUSED_DECODE_KERNEL=bulk needs an sm_90 GPU"):
            _ops.lora_decode(x, w, a, b, 1.0)
        return
    monkeypatch.setenv("LORA_FUSED_DECODE_KERNEL", "bulk")
    monkeypatch.setenv("LORA_FUSED_DECODE_ROWS", "64")
    with pytest.raises(RuntimeError, match="LORA_FUSED_DECODE_ROWS must be one of 16, 32; got '64'"):
        _ops.lora_decode(x, w, a, b, 1.0)
    monkeypatch.setenv("LORA_FUSED_DECODE_ROWS", "32")
    monkeypatch.setenv("LORA_FUSED_DECODE_STAGES", "8")  # 8 x 34816 bytes of ring: more than a block may have
    with pytest.raises(RuntimeError, match="LORA_FUSED_DECODE_STAGES=8 with 32-row tiles needs"):
        _ops.lora_decode(x, w, a, b, 1.0)
    monkeypatch.setenv("LORA_FUSED_DECODE_STAGES", "1")
    with pytest.raises(RuntimeError, match="LORA_FUSED_DECODE_STAGES must be one of 2, 3, 4, 5, 6, 7, 8; got '1'"):
        _ops.lora_decode(x, w, a, b, 1.0)
    monkeypatch.delenv("LORA_FUSED_DECODE_STAGES")
    assert torch.isfinite(_ops.lora_decode(x, w, a, b, 1.0)).all()  # the context is still healthy


@pytest.mark.parametrize("device,kernel", DECODE_KERNELS)
def test_lora_decode_strided_x_and_opcheck(device, kernel, monkeypatch):
    force_decode_kernel(monkeypatch, kernel)
    x = randn(4, 264, dtype=torch.bfloat16, device=device)[:, 8:]  # row stride 264, 16-byte aligned rows
    w = randn(48, 256, dtype=torch.bfloat16, device=device, scale=1 / 16)
    a, b = randn(8, 256, dtype=torch.bfloat16, device=device, scale=1 / 16), randn(48, 8, dtype=torch.bfloat16, device=device)
    y = _ops.lora_decode(x, w, a, b, 2.0)
    assert_error_rule(y, reference.lora_linear(x, w, a, b, 2.0), x @ w.t() + 2.0 * ((x @ a.t()) @ b.t()), "strided x")
    b_t = randn(8, 48, dtype=torch.bfloat16, device=device).t()  # lora_B with column stride 48
    w_s = randn(48, 264, dtype=torch.bfloat16, device=device, scale=1 / 16)[:, :256]  # weight row stride 264
    assert_error_rule(_ops.lora_decode(x, w_s, a, b_t, 2.0), reference.lora_linear(x, w_s, a, b_t, 2.0),
                      x @ w_s.t() + 2.0 * ((x @ a.t()) @ b_t.t()), "strided weight and lora_B")
    # lora_B rows not 16-byte aligned (row stride 12; then the storage's second element): the
    # tensor-core kernel stages them with element loads instead of 16-byte copies.
    for b_odd in (randn(48, 12, dtype=torch.bfloat16, device=device)[:, :8],
                  randn(48 * 8 + 1, dtype=torch.bfloat16, device=device)[1:].view(48, 8)):
        assert_error_rule(_ops.lora_decode(x, w, a, b_odd, 2.0), reference.lora_linear(x, w, a, b_odd, 2.0),
                          x @ w.t() + 2.0 * ((x @ a.t()) @ b_odd.t()), f"lora_B strides {b_odd.stride()}")
    x_odd = randn(3, 257, dtype=torch.bfloat16, device=device)[:, 1:]  # misaligned rows: fallback path
    assert_error_rule(_ops.lora_decode(x_odd, w, a, b, 2.0), reference.lora_linear(x_odd, w, a, b, 2.0),
                      x_odd @ w.t() + 2.0 * ((x_odd @ a.t()) @ b.t()), "misaligned x")
    torch.library.opcheck(torch.ops.lora_fused.lora_decode.default, (x.contiguous(), w, a, b, 2.0, None))
    with pytest.raises(ValueError, match=r"expected x \[M, k\], weight \[d, k\]"):
        _ops.lora_decode(x, w[:, :255], a, b, 2.0)
