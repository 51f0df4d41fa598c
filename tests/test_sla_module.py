"""slab.nn.SimplifiedLinearAttention against SLAB's formula in float64: a SLAB-style module
(the same parameter names, SLAB's einsum forward) loads into ours with load_state_dict and gives
the same output and parameter gradients; causal prefill + step-by-step decoding equals one
forward; torch.compile; bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slab.nn import SimplifiedLinearAttention

from conftest import DEVICES, FLOAT_DTYPES, assert_close

EPS = 1e-6


class SlabStyleAttention(nn.Module):
    """SLAB's SimplifiedLinearAttention forward (float64 reference), plus a causal variant: the
    same parameters and names; causal attention by prefix sums and a causal Conv1d branch."""

    def __init__(self, dim, num_heads, causal, qkv_bias, kernel, num_tokens):
        super().__init__()
        d = dim // num_heads
        self.num_heads, self.causal = num_heads, causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwc = (
            nn.Conv1d(d, d, kernel, groups=d) if causal else nn.Conv2d(d, d, kernel, groups=d, padding=kernel // 2)
        )
        self.positional_encoding = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.5)

    def forward(self, x):
        b, n, c = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, c).permute(2, 0, 1, 3).unbind(0)
        k = k + self.positional_encoding[:, :n]
        q, k = F.relu(q), F.relu(k)
        q, k, v = (t.reshape(b, n, h, c // h).transpose(1, 2).reshape(b * h, n, c // h) for t in (q, k, v))
        if self.causal:
            scores = torch.tril(q @ k.transpose(1, 2))
            out = (scores @ v) / (scores.sum(-1, keepdim=True) + EPS)
            fm = F.conv1d(
                F.pad(v.transpose(1, 2), (self.dwc.weight.shape[-1] - 1, 0)),
                self.dwc.weight,
                self.dwc.bias,
                groups=v.shape[-1],
            ).transpose(1, 2)
        else:
            z = 1 / (torch.einsum("bic,bc->bi", q, k.sum(1)) + EPS)
            out = torch.einsum("bic,bcd,bi->bid", q, torch.einsum("bjc,bjd->bcd", k, v), z)
            side = math.isqrt(n)
            fm = self.dwc(v.transpose(1, 2).reshape(b * h, -1, side, side)).reshape(b * h, -1, n).transpose(1, 2)
        out = (out + fm).reshape(b, h, n, c // h).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


CONFIGS = [  # (dim, heads, causal, qkv_bias, kernel, tokens)
    (48, 3, False, False, 5, 16),
    (32, 2, False, True, 3, 9),
    (32, 4, True, False, 4, 13),
    (24, 1, True, True, 2, 1),
]


def build_pair(device, config):
    dim, heads, causal, bias, kernel, tokens = config
    ref = SlabStyleAttention(dim, heads, causal, bias, kernel, tokens).double()
    ours = SimplifiedLinearAttention(
        dim, heads, causal=causal, qkv_bias=bias, dwc_kernel_size=kernel, num_tokens=tokens
    ).to(device)
    ours.load_state_dict(ref.state_dict())  # strict: the same keys and shapes as SLAB's module
    return ref, ours


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"d{c[0]}h{c[1]}{'causal' if c[2] else 'vision'}k{c[4]}n{c[5]}"
)
def test_module_matches_slab_formula(device, dtype, config):
    ref, ours = build_pair(device, config)
    ours = ours.to(dtype)
    x = torch.randn(2, config[5], config[0], dtype=torch.float64)
    expected = ref(x)
    out = ours(x.to(device, dtype))
    assert out.dtype == dtype
    # Two projections around the attention: 16-bit inputs round at each of them.
    rtol, atol = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (8e-3, 8e-3)}[dtype]
    assert_close(out, expected, dtype, rtol=rtol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS[:3], ids=["vision", "vision_bias", "causal"])
def test_module_gradients_float64(device, config):
    ref, ours = build_pair(device, config)
    ours = ours.double()
    x = torch.randn(2, config[5], config[0], dtype=torch.float64)
    xr, xo = x.clone().requires_grad_(), x.to(device).requires_grad_()
    grad = torch.randn(2, config[5], config[0], dtype=torch.float64)
    ref(xr).backward(grad)
    ours(xo).backward(grad.to(device))
    assert_close(xo.grad, xr.grad, name="grad_x")
    for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
        assert_close(p.grad, p_ref.grad, name=f"grad_{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prompt", [1, 4])
def test_prefill_and_step_equal_forward(device, dtype, prompt):
    torch.manual_seed(0)
    m = SimplifiedLinearAttention(32, 4, causal=True, dwc_kernel_size=4, num_tokens=12).to(device, dtype)
    with torch.no_grad():
        m.positional_encoding.normal_()
    x = torch.randn(3, 12, 32, device=device, dtype=dtype)
    with torch.no_grad():
        full = m(x)
    out, cache = m.prefill(x[:, :prompt])
    assert cache.position == prompt
    steps = [m.step(x[:, t], cache) for t in range(prompt, 12)]
    got = torch.cat([out, torch.stack(steps, 1)], 1)
    assert_close(
        got,
        full.float(),
        dtype,
        rtol=2e-2 if dtype != torch.float32 else 1e-5,
        atol=2e-2 if dtype != torch.float32 else 1e-5,
    )
    assert m.step(x[:, 0:1], m.init_cache(3, device, dtype)).shape == (3, 1, 32)


def test_module_compile_fullgraph():
    m = SimplifiedLinearAttention(32, 2, num_tokens=16)
    x = torch.randn(2, 16, 32)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x), m(x).detach())


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="divide"):
        SimplifiedLinearAttention(30, 4)
    with pytest.raises(ValueError, match="odd"):
        SimplifiedLinearAttention(32, 4, dwc_kernel_size=4)
    m = SimplifiedLinearAttention(32, 4, num_tokens=8)
    with pytest.raises(ValueError, match="num_tokens"):
        m(torch.randn(1, 16, 32))
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(16, 32))
    with pytest.raises(RuntimeError, match="causal"):
        m.prefill(torch.randn(1, 4, 32))
