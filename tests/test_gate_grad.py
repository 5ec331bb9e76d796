"""The gate's gradient outside the attention kernel: the formula, the pass that computes it, and
the "flex_gategrad" attention path built on them.

    dlg_s = sum_{h in group} sum_{t >= s + window} P_h[t, s] (dO_ht . v_s - Delta_ht),   Delta_ht = dO_ht . O_ht

Oracle: autograd through spkv.reference_attention, in float64.
"""

import pytest
import torch
from hypothesis import given, strategies as st

import kernels
import spkv
from conftest import needs_cuda
from model import GPT
from tiny import tiny_config

TOL = 1e-10  # float64


@st.composite
def problems(draw, max_t=150):
    """A float64 problem: q (B, H, T, D), k, v (B, Hkv, T, D), log-gates lg (B, Hkv, T) with some
    large negative (but finite) entries, and the gradient dout (B, H, T, D) of a random loss."""
    B, Hkv, G = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    T, D = draw(st.integers(1, max_t)), draw(st.sampled_from([4, 8, 16]))
    window = draw(st.integers(1, T))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    f64 = torch.float64
    q = torch.randn(B, Hkv * G, T, D, generator=g, dtype=f64)
    k, v = torch.randn(B, Hkv, T, D, generator=g, dtype=f64), torch.randn(B, Hkv, T, D, generator=g, dtype=f64)
    lg = spkv.soft_log_gate(3 * torch.randn(B, Hkv, T, generator=g, dtype=f64))  # (B, Hkv, T) log u <= 0
    closed = torch.rand(B, Hkv, T, generator=g, dtype=f64) < 0.2  # gates shut hard, but finite
    lg = torch.where(closed, -1e4 * torch.rand(B, Hkv, T, generator=g, dtype=f64) - 30, lg)
    dout = torch.randn(B, Hkv * G, T, D, generator=g, dtype=f64)
    return dict(q=q, k=k, v=v, lg=lg, window=window, dout=dout)


def autograd_grads(p, impl):
    """Output and the gradients of <out, dout> w.r.t. q, k, v, lg through kernels.attention(impl)."""
    leaves = [p[n].clone().requires_grad_() for n in ("q", "k", "v", "lg")]
    out = kernels.attention(*leaves[:3], leaves[3], p["window"], impl)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, p["dout"]))


def max_err(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    return (a - b).abs().max().item() if a.numel() else 0.0


@given(problems(max_t=40))
def test_gate_grad_formula_matches_autograd(p):
    """spkv.reference_gate_grad (the formula in plain ops) is the autograd gradient w.r.t. lg."""
    want = autograd_grads(p, "reference")[4]
    got = spkv.reference_gate_grad(p["q"], p["k"], p["v"], p["lg"], p["window"], p["dout"])
    assert max_err(got, want) <= TOL


@given(problems())
def test_gate_grad_pass_matches_formula(p):
    """The FlexAttention pass (spkv::gate_grad) gives spkv.reference_gate_grad's dlg."""
    q, k, v, lg, window, dout = (p[n] for n in ("q", "k", "v", "lg", "window", "dout"))
    out = spkv.reference_attention(q, k, v, lg, window)  # (B, H, T, D)
    lse = lse_of(q, k, lg, window)  # (B, H, T)
    got = torch.ops.spkv.gate_grad(dout, q, k, v, lg, out, lse, window, False)
    assert max_err(got, spkv.reference_gate_grad(q, k, v, lg, window, dout)) <= TOL


def lse_of(q, k, lg, window):
    """Log-sum-exp (B, H, T) of reference_attention's score rows, in plain ops."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    pos = torch.arange(T)
    scores = q @ k.repeat_interleave(G, 1).transpose(-1, -2) / D ** 0.5  # (B, H, T, S)
    return (scores + spkv.gate_bias(lg, pos, pos, window).repeat_interleave(G, 1)).logsumexp(-1)


@given(problems())
def test_flex_gategrad_matches_reference_forward_and_backward(p):
    """Output and the gradients w.r.t. q, k, v and lg of "flex_gategrad" equal autograd through
    spkv.reference_attention, in float64."""
    want, got = autograd_grads(p, "reference"), autograd_grads(p, "flex_gategrad")
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlg"), got, want):
        assert max_err(a, b) <= TOL, name


@pytest.mark.parametrize("a", [0.7, 1.0])
def test_flex_gategrad_with_shut_gates_matches_reference(a):
    """Under the annealed view at a = 1 dropped keys have lg = -inf: the pass's empty rows give
    dlg = 0, not NaN, and the gradient reaching the gate logits equals the reference's."""
    g = torch.Generator().manual_seed(1)
    B, Hkv, G, T, D, window = 2, 2, 2, 70, 8, 9
    base = [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in
            ((B, Hkv * G, T, D), (B, Hkv, T, D), (B, Hkv, T, D), (B, Hkv, T))]  # q, k, v, gate logits
    grads = {}
    for impl in ("reference", "flex_gategrad"):
        leaves = [x.clone().requires_grad_() for x in base]
        lg = spkv.annealed_log_gate(3 * leaves[3], 0.5, torch.tensor(a, dtype=torch.float64))  # (B, Hkv, T)
        out = kernels.attention(*leaves[:3], lg, window, impl)
        grads[impl] = [out.detach()] + list(torch.autograd.grad(out.square().sum(), leaves))
    for x, y in zip(grads["flex_gategrad"], grads["reference"]):
        assert torch.isfinite(x).all() and max_err(x, y) <= TOL


def small_problem(B=1, Hkv=2, G=2, T=40, D=8, dtype=torch.float64, device="cpu", seed=0):
    """q (B, H, T, D), k, v (B, Hkv, T, D), gate logits (B, Hkv, T)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype, device=device) for shape in
            ((B, Hkv * G, T, D), (B, Hkv, T, D), (B, Hkv, T, D), (B, Hkv, T))]


def loss_and_grads(fn, base):
    """The loss fn(q, k, v, logits) and its gradients w.r.t. the four."""
    leaves = [x.clone().requires_grad_() for x in base]
    loss = fn(*leaves)
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_flex_gategrad_traces_fullgraph_forward_and_backward(backend):
    """The path traces into one graph (the custom ops through their fake implementations), and
    under aot_eager the backward graph with spkv::gate_grad in it too; the reference's numbers."""
    window = 5

    def step(q, k, v, logit, impl="flex_gategrad"):
        out = kernels.attention(q, k, v, spkv.soft_log_gate(logit), window, impl)
        return out.square().sum()

    base = small_problem()
    want = loss_and_grads(lambda *x: step(*x, impl="reference"), base)
    torch._dynamo.reset()
    got = loss_and_grads(torch.compile(step, fullgraph=True, backend=backend), base)
    for a, b in zip(got, want):
        assert max_err(a, b) <= TOL


def test_flex_gategrad_takes_the_block_mask_and_plain_layers():
    """The caller's causal BlockMask is used as on the other flex paths; lg None is plain causal
    attention; without gradients the output is FlexAttention's."""
    q, k, v, logit = small_problem(T=30)
    lg = spkv.soft_log_gate(logit)
    mask = kernels.causal_block_mask(30, "cpu")
    for gates in (lg, None):
        want = spkv.reference_attention(q, k, v, gates, 4)
        assert max_err(kernels.attention(q, k, v, gates, 4, "flex_gategrad", block_mask=mask), want) <= TOL
    with torch.no_grad():
        got = kernels.attention(q, k, v, lg.requires_grad_(), 4, "flex_gategrad", block_mask=mask)
    assert max_err(got, spkv.reference_attention(q, k, v, lg, 4)) <= TOL


def test_model_trains_the_predictor_through_flex_gategrad():
    """GPT with attn_impl="flex_gategrad": loss and every parameter gradient (the predictors'
    included, which reach them only through dlg) equal the "reference" path's. A float64 model,
    but the predictor runs in fp32 (spkv.UtilityPredictor), so fp32 roundoff bounds the match."""
    torch.manual_seed(0)
    model = GPT(tiny_config(window=4)).double()
    with torch.no_grad():  # gates that differ from key to key, so dlg is not ~0
        for layer in model.modules():
            if isinstance(layer, spkv.UtilityPredictor):
                layer.proj.weight.normal_(0, 1.0)
    x, y = torch.randint(0, 257, (2, 24)), torch.randint(0, 257, (2, 24))  # (B, T) tokens, targets
    grads = {}
    for impl in ("reference", "flex_gategrad"):
        model.attn_impl = impl
        model.zero_grad()
        loss = model(x, y, a=0.3)[1]
        loss.backward()
        grads[impl] = [loss.detach()] + [p.grad.clone() for p in model.parameters()]
    predictor = [p.grad for n, p in model.named_parameters() if "proj.weight" in n and p.grad is not None]
    assert predictor and all(g.abs().max() > 0 for g in predictor)
    for a, b in zip(grads["flex_gategrad"], grads["reference"]):
        assert max_err(a, b) <= 1e-5 * b.abs().max().item()


@needs_cuda
@pytest.mark.parametrize("T,window", [(512, 64), (300, 37)])
def test_flex_gategrad_on_cuda_matches_flex_compiled(T, window):
    """On CUDA at bf16: output and the gradients w.r.t. q, k, v and the gate logits of
    "flex_gategrad" (eager call, and inside torch.compile(fullgraph=True)) match its twin
    "flex_compiled", whose dlg comes from FlexAttention's own backward."""
    base = small_problem(B=2, Hkv=2, G=3, T=T, D=64, dtype=torch.float32, device="cuda")

    def step(q, k, v, logit, impl="flex_gategrad"):
        lg = spkv.soft_log_gate(3 * logit)  # (B, Hkv, T) fp32
        out = kernels.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), lg, window, impl)
        return out.float().square().mean()

    twin = loss_and_grads(lambda *x: step(*x, impl="flex_compiled"), base)
    torch._dynamo.reset()
    for fn in (step, torch.compile(step, fullgraph=True)):
        for a, b in zip(loss_and_grads(fn, base), twin):
            assert torch.isfinite(a).all()
            assert (a - b).abs().max().item() <= 3e-2 * (b.abs().max().item() + 1e-6)
