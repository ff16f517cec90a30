"""Small models the patch and adapter tests share: Tiny (nn.Linear layers named like attention
projections) and Tiny4bit (the same with bitsandbytes NF4 Linear4bit layers)."""

import pytest
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(32, 48)
        self.v_proj = nn.Linear(48, 32, bias=False)
        self.out = nn.Linear(32, 8)

    def forward(self, x):
        return self.out(torch.relu(self.v_proj(torch.relu(self.q_proj(x)))))


class Tiny4bit(nn.Module):
    """Tiny's shape with bitsandbytes NF4 layers (K = 128, 256: bitsandbytes 0.50.2's CPU decode is
    wrong for some other widths, see test_nf4_linear.py)."""

    def __init__(self, device, compute_dtype):
        super().__init__()
        bnb = pytest.importorskip("bitsandbytes")
        torch.manual_seed(0)
        for name, (k, n, bias) in {"q_proj": (128, 256, True), "v_proj": (256, 128, False)}.items():
            lin = nn.Linear(k, n, bias=bias)
            q = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
            q.load_state_dict(lin.state_dict())
            setattr(self, name, q.to(device))
        self.out = nn.Linear(128, 8).to(device)

    def forward(self, x):
        return self.out(torch.relu(self.v_proj(torch.relu(self.q_proj(x)))))
