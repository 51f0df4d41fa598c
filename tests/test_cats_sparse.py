"""CATS calibration and conversion (SPEC section 3): slab.sparse.StreamingHistogram /
ThresholdCalibrator / calibrate / convert and slab.nn.CATSMLP, on toy MLPs and on a small random
Hugging Face LlamaForCausalLM (when transformers is installed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slab
import slab.nn
import slab.sparse

from conftest import assert_close, ref_copy


# ---- toy models --------------------------------------------------------------------------------


class GatedMLP(nn.Module):  # Llama naming
    def __init__(self, d, f, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PlainMLP(nn.Module):  # SLAB / timm naming
    def __init__(self, d, f, act=None):
        super().__init__()
        self.fc1 = nn.Linear(d, f)
        self.act = act if act is not None else nn.SiLU()
        self.fc2 = nn.Linear(f, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Stack(nn.Module):
    def __init__(self, mlps):
        super().__init__()
        self.layers = nn.ModuleList(mlps)

    def forward(self, x):
        for m in self.layers:
            x = x + m(x)
        return x


def ref_gated(mlp, x, t):
    x64 = ref_copy(x, False)
    g = x64 @ ref_copy(mlp.gate_proj.weight, False).t()
    s = F.silu(g)
    h = torch.where(s.abs() > t, s, 0) * (x64 @ ref_copy(mlp.up_proj.weight, False).t())
    return h @ ref_copy(mlp.down_proj.weight, False).t()


# ---- streaming histogram -----------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9, 0.99])
def test_histogram_quantile_within_one_bin(q):
    h = slab.sparse.StreamingHistogram(bins=512)
    chunks = []
    for scale in [0.5, 1.0, 3.0, 10.0, 2.0]:  # growing maxima force range doublings
        c = torch.randn(5000).abs() ** 1.5 * scale
        chunks.append(c)
        h.update(c)
    data = torch.cat(chunks).double()
    exact = float(torch.quantile(data, q))
    got = h.quantile(q)
    assert h.total == data.numel()
    assert h.hi > float(data.max()) and h.hi <= 2 * float(data.max()) * (1 + 2**-9)
    assert abs(got - exact) <= h.bin_width, (got, exact, h.bin_width)
    # a coarse histogram is correspondingly coarse, yet still within its one bin
    h2 = slab.sparse.StreamingHistogram(bins=8)
    h2.update(data)
    assert abs(h2.quantile(q) - exact) <= h2.bin_width
    assert h2.bin_width > h.bin_width


def test_histogram_edge_cases():
    h = slab.sparse.StreamingHistogram(bins=16)
    with pytest.raises(ValueError, match="empty"):
        h.quantile(0.5)
    h.update(torch.zeros(10))
    assert h.quantile(0.5) <= h.bin_width
    h.update(torch.tensor([float("nan"), float("inf"), 5.0]))
    assert h.nonfinite == 2 and h.total == 11
    with pytest.raises(ValueError, match="q must be"):
        h.quantile(1.5)
    with pytest.raises(ValueError, match="bins"):
        slab.sparse.StreamingHistogram(bins=7)


# ---- calibration ---------------------------------------------------------------------------------


def test_calibrate_gated_and_plain():
    d, f = 24, 56
    model = Stack([GatedMLP(d, f), PlainMLP(d, f), GatedMLP(d, f)])
    batches = [torch.randn(3, 7, d) for _ in range(4)]
    # gather the exact activations by hand for the reference
    acts = {name: [] for name in ("layers.0", "layers.1", "layers.2")}
    hooks = [
        model.layers[0].gate_proj.register_forward_hook(lambda m, i, o: acts["layers.0"].append(F.silu(o))),
        model.layers[1].fc1.register_forward_hook(lambda m, i, o: acts["layers.1"].append(F.silu(o))),
        model.layers[2].gate_proj.register_forward_hook(lambda m, i, o: acts["layers.2"].append(F.silu(o))),
    ]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    bins = 1024
    with slab.sparse.ThresholdCalibrator(model, sparsity=0.5, bins=bins) as cal, torch.no_grad():
        for b in batches:
            model(b)
    th = cal.thresholds()
    assert set(th) == set(acts)
    for name, a in acts.items():
        vals = torch.cat([x.reshape(-1) for x in a]).abs().double()
        width = cal.histograms[name].bin_width
        assert abs(th[name] - float(torch.quantile(vals, 0.5))) <= width, name
        dropped = float((vals <= th[name]).double().mean())
        assert abs(dropped - 0.5) < 0.02, (name, dropped)
    # hooks are gone after the context: more forwards do not change the histograms
    n = cal.histograms["layers.0"].total
    model(batches[0])
    assert cal.histograms["layers.0"].total == n
    # the functional form gives the same thresholds; other sparsities from the same histograms
    th2 = slab.sparse.calibrate(model, batches, 0.5, bins=bins)
    assert th2 == pytest.approx(th)
    hi = cal.thresholds(0.9)
    assert all(hi[k] > th[k] for k in th)


def test_calibrate_errors():
    with pytest.raises(ValueError, match="no supported MLP"):
        slab.sparse.ThresholdCalibrator(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="SiLU"):
        slab.sparse.ThresholdCalibrator(Stack([PlainMLP(4, 8, act=nn.GELU())]))
    with pytest.raises(ValueError, match="sparsity"):
        slab.sparse.ThresholdCalibrator(Stack([GatedMLP(4, 8)]), sparsity=1.0)


# ---- CATSMLP and convert ---------------------------------------------------------------------------


def gap_threshold(s: torch.Tensor) -> float:
    """A threshold near the median of s in the widest gap between neighbouring values, so float32
    vs float64 rounding of the gates cannot flip a keep decision."""
    v = s.reshape(-1).double().sort().values
    lo, hi = int(0.3 * v.numel()), max(int(0.7 * v.numel()), int(0.3 * v.numel()) + 1)
    gaps = v[lo + 1 : hi + 1] - v[lo:hi]
    i = lo + int(gaps.argmax())
    assert float(v[i + 1] - v[i]) > 1e-4 * float(v[i + 1])
    return float(v[i] + v[i + 1]) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_catsmlp_paths_agree(dtype):
    d, f = 40, 96
    mlp = GatedMLP(d, f).to(dtype)
    cm = slab.nn.CATSMLP.from_mlp(mlp, 0.0)
    # owns only the transposed W_down
    names = {n for n, _ in cm.named_parameters()}
    assert names == {"gate.weight", "up.weight", "w_down_t"}
    assert torch.equal(cm.w_down_t, mlp.down_proj.weight.t())
    assert cm.w_down_t.is_contiguous()
    wg, wu, wd = (ref_copy(w, False) for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight))
    for tokens in (1, 5, 16, 17, 40):
        x = torch.randn(1, tokens, d, dtype=torch.float64).to(dtype)
        x64 = ref_copy(x, False)
        decode = tokens <= 16
        with torch.no_grad():
            assert cm._use_decode_kernel(x) == decode
            # decode: fp32-accumulated gates of the rounded inputs; dense: the Linear's own
            # (rounded) gate output, which is what the cats op then sees
            g = x64 @ wg.t() if decode else ref_copy(mlp.gate_proj(x), False)
            cm.threshold = gap_threshold(F.silu(g).abs())
            y = cm(x)
        sg = F.silu(g)
        h = torch.where(sg.abs() > cm.threshold, sg, 0)
        up = x64 @ wu.t() if decode else ref_copy(mlp.up_proj(x), False)
        if not decode and dtype == torch.bfloat16:
            h = h.to(dtype).double() * up  # the dense path multiplies in bf16
        else:
            h = h * up
        ref = h @ wd.t()
        assert int((sg.abs() <= cm.threshold).sum()) > 0.25 * sg.numel()  # the threshold drops values
        assert_close(y, ref, name=f"{tokens} tokens")


def test_catsmlp_training_grads():
    d, f, t = 16, 40, 0.2
    mlp = GatedMLP(d, f, bias=True).double()
    cm = slab.nn.CATSMLP.from_mlp(mlp, t)
    x = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    assert not cm._use_decode_kernel(x)
    y = cm(x)
    g = mlp.gate_proj(x)
    s = F.silu(g)
    ref = mlp.down_proj(torch.where(s.abs() > t, s, 0) * mlp.up_proj(x))
    assert_close(y, ref, name="y")
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, cm.w_down_t, cm.down_bias, cm.gate.weight], dy)
    rgrads = torch.autograd.grad(ref, [x, mlp.down_proj.weight, mlp.down_proj.bias, mlp.gate_proj.weight], dy)
    assert_close(grads[0], rgrads[0], name="dx")
    assert_close(grads[1], rgrads[1].t(), name="d w_down_t")
    assert_close(grads[2], rgrads[2], name="d down_bias")
    assert_close(grads[3], rgrads[3], name="d gate")


def test_catsmlp_plain_fc_mlp():
    d, f, t = 12, 30, 0.1
    mlp = PlainMLP(d, f)
    cm = slab.nn.CATSMLP.from_mlp(mlp, t)
    x = torch.randn(2, d)
    with torch.no_grad():
        s = F.silu(mlp.fc1(x))
        ref = mlp.fc2(torch.where(s.abs() > t, s, 0))
        assert_close(cm(x), ref, name="y")


def test_convert_stack_and_errors():
    d, f = 20, 48
    model = Stack([GatedMLP(d, f), GatedMLP(d, f)])
    x = torch.randn(1, 2, d)
    with torch.no_grad():
        dense = model(x)
    with pytest.raises(ValueError, match="missing"):
        slab.sparse.convert(model, {"layers.0": 0.0})
    with pytest.raises(ValueError, match="unknown"):
        slab.sparse.convert(model, {"layers.0": 0.0, "layers.1": 0.0, "nope": 0.1})
    slab.sparse.convert(model, 0.0)
    assert all(isinstance(m, slab.nn.CATSMLP) for m in model.layers)
    assert slab.sparse.find_mlps(model) == {}
    with torch.no_grad():
        assert_close(model(x), dense, name="threshold 0 == dense")
    with pytest.raises(ValueError, match="threshold"):
        slab.nn.CATSMLP.from_mlp(GatedMLP(4, 8), float("nan"))


def test_catsmlp_compile():
    d, f, t = 16, 40, 0.1
    cm = slab.nn.CATSMLP.from_mlp(GatedMLP(d, f), t).requires_grad_(False)
    x = torch.randn(2, d)
    with torch.no_grad():
        eager = cm(x)
        compiled = torch.compile(cm, fullgraph=True)(x)
    assert_close(compiled, eager, name="compiled")


# ---- a small random Hugging Face Llama -------------------------------------------------------------


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model


def _greedy_logits(model, prompt, steps):
    """Prefill (dense path) then token-by-token decode with the KV cache (sparse kernel path)."""
    out = model(prompt, use_cache=True)
    logits = [out.logits[:, -1]]
    past = out.past_key_values
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        out = model(tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits[:, -1])
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.stack(logits, 1)


def test_convert_hf_llama():
    model = _tiny_llama()
    prompt = torch.randint(0, 96, (1, 20))  # > 16 tokens: prefill takes the dense path
    with torch.no_grad():
        dense_prefill = model(prompt).logits
        dense = _greedy_logits(model, prompt, 4)
    calib = [torch.randint(0, 96, (2, 16)) for _ in range(3)]
    th = slab.sparse.calibrate(model, calib, sparsity=0.5)
    assert set(th) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert all(v > 0 for v in th.values())

    import copy

    zero = slab.sparse.convert(copy.deepcopy(model), 0.0)
    calls = []
    for m in zero.modules():
        if isinstance(m, slab.nn.CATSMLP):
            m.register_forward_pre_hook(lambda mod, args: calls.append(mod._use_decode_kernel(args[0])))
            assert not hasattr(m, "down_proj")
    with torch.no_grad():
        assert_close(zero(prompt).logits, dense_prefill, name="prefill, t = 0")
        assert_close(_greedy_logits(zero, prompt, 4), dense, name="decode, t = 0")
    assert any(calls) and not all(calls), "both the sparse decode and the dense prefill path must run"

    half = slab.sparse.convert(copy.deepcopy(model), th)
    with torch.no_grad():
        sparse_prefill = half(prompt).logits
    rel = float((sparse_prefill - dense_prefill).norm() / dense_prefill.norm())
    assert 0 < rel < 0.25, rel
    agree = float((sparse_prefill.argmax(-1) == dense_prefill.argmax(-1)).double().mean())
    assert agree >= 0.75, agree
