"""Narrows a racecheck report in scripts/sanitize_slice.py down to one call (development tool):

    compute-sanitizer --tool racecheck --kernel-name kns=lora_fused python scripts/racecheck_probe.py CASE

CASE: torch_dropout_mm (no lora_fused kernel), lora_nodrop (lora_linear fwd+bwd, p = 0),
lora_drop_fwd (lora_linear forward with dropout), lora_drop (forward+backward with dropout),
nf4_decode_lora_a (nf4_linear's block-aligned decode kernel, M = 9, u from lora_A: the shrink kernel
then the decode kernel).
"""

import sys

import torch

import lora_fused


def main(case: str) -> None:
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to("cuda", torch.bfloat16)  # noqa: E731
    x, w, a, b = mk(1, 96), mk(40, 96), mk(8, 96), mk(40, 8)
    if case == "nf4_decode_lora_a":
        from lora_fused import _ops, nf4
        from lora_fused.functional import _nf4_args

        packed, state = nf4.quantize(mk(4500, 256).float(), 64, double_quant=False)
        x, a, b = mk(9, 256), mk(16, 256) * 0.06, mk(4500, 16) * 0.3
        y = _ops.nf4_linear(x, *_nf4_args("nf4_linear", x, packed, state), None, None, b, a, 2.0)
    elif case == "torch_dropout_mm":
        y = torch.mm(torch.nn.functional.dropout(x, 0.1), w.t()) + 1
    else:
        xg, ag, bg = (t.clone().requires_grad_() for t in (x, a, b))
        y = lora_fused.lora_linear(xg, w, ag, bg, 2.0, dropout_p=0.0 if case == "lora_nodrop" else 0.1)
        if case != "lora_drop_fwd":
            y.float().square().sum().backward()
    torch.cuda.synchronize()
    print(case, "finished", bool(torch.isfinite(y).all()))


if __name__ == "__main__":
    main(sys.argv[1])
