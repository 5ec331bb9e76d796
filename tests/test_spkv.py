"""Property tests: SP-KV attention against dense attention and against METHOD.md's formulas.

The oracles here are written independently of spkv.py: dense attention over an explicit boolean
mask (keys repeated per query head), and the soft formula in its multiplicative form
p[t, s] ~ exp(q.k / sqrt(D)) * (u_s if t - s >= w else 1), normalized over s <= t.
"""

import math

import pytest
import torch
from hypothesis import given, strategies as st

import kernels
import spkv
from conftest import needs_cuda
from model import GPT
from tiny import tiny_config

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
A = {"soft": 0.0, "hard": 1.0}  # the anneal weight a of each gate view


@st.composite
def problems(draw, max_t=40):
    """A random attention problem: q (B, H, T, D), k, v (B, Hkv, T, D), gate logits (B, Hkv, T)."""
    B, Hkv, G = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    T, D = draw(st.integers(1, max_t)), draw(st.sampled_from([4, 8, 16]))
    window = draw(st.integers(1, max_t + 4))
    tau = draw(st.floats(0.0, 1.0))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(B, Hkv * G, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=dtype)
    logit = 3 * torch.randn(B, Hkv, T, generator=g, dtype=dtype)
    return dict(q=q, k=k, v=v, logit=logit, window=window, tau=tau)


def dense_masked(q, k, v, allowed):
    """Plain softmax attention over allowed (B, Hkv, T, S) pairs, k/v repeated per query head."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    allowed = allowed.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def causal(B, Hkv, T):
    return torch.ones(T, T, dtype=torch.bool).tril().expand(B, Hkv, T, T)


def in_window(T, window):
    i = torch.arange(T)
    return (i[:, None] - i[None, :]) < window  # (T, S)


def soft_formula(q, k, v, logit, window):
    """METHOD.md section 2 in multiplicative form: exp(score) * u_s for keys older than the window."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    u = torch.sigmoid(logit).repeat_interleave(G, 1)  # (B, H, S)
    T = q.shape[2]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s - s.amax(-1, keepdim=True)  # stabilizer; cancels in the ratio
    mult = torch.where(in_window(T, window), torch.ones_like(u[:, :, None, :]), u[:, :, None, :])
    w = torch.exp(s) * mult * torch.ones(T, T, dtype=q.dtype).tril()
    return (w / w.sum(-1, keepdim=True)) @ v


def close(a, b, tol):
    assert a.shape == b.shape
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"max abs diff {err:.3g} > {tol:.3g}"


@given(problems())
def test_open_gates_are_dense_causal_attention(p):
    q, k, v = p["q"], p["k"], p["v"]
    lg = torch.zeros_like(p["logit"])  # u = 1 everywhere
    out = spkv.reference_attention(q, k, v, lg, p["window"])
    close(out, dense_masked(q, k, v, causal(q.shape[0], k.shape[1], q.shape[2])), TOL[q.dtype])


@given(problems())
def test_window_covering_everything_is_dense_whatever_u(p):
    q, k, v = p["q"], p["k"], p["v"]
    T = q.shape[2]
    for a in (0.0, 1.0):  # soft, hard
        lg = spkv.annealed_log_gate(p["logit"], p["tau"], a)
        out = spkv.reference_attention(q, k, v, lg, window=T + p["window"])
        close(out, dense_masked(q, k, v, causal(q.shape[0], k.shape[1], T)), TOL[q.dtype])


@given(problems())
def test_soft_matches_formula_outputs_and_gradients(p):
    tol = {torch.float64: 1e-10, torch.float32: 1e-4}[p["q"].dtype]
    leaves = [p[n].clone().requires_grad_() for n in ("q", "k", "v", "logit")]
    out = spkv.reference_attention(*leaves[:3], spkv.soft_log_gate(leaves[3]), p["window"])
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    leaves2 = [x.detach().clone().requires_grad_() for x in leaves]
    ref = soft_formula(*leaves2, p["window"])
    ref_grads = torch.autograd.grad(ref, leaves2, grad_out, allow_unused=True)
    close(out, ref, tol)
    for name, g, r in zip("qkv", grads, ref_grads):
        close(g, r, tol * 10)
    close(grads[3], ref_grads[3] if ref_grads[3] is not None else torch.zeros_like(grads[3]), tol * 10)


@given(problems())
def test_hard_is_dense_over_window_and_kept(p):
    q, k, v = p["q"], p["k"], p["v"]
    B, Hkv, T = p["logit"].shape
    keep = torch.sigmoid(p["logit"].float()) >= p["tau"]  # (B, Hkv, S): written out, not from spkv
    allowed = causal(B, Hkv, T) & (in_window(T, p["window"]) | keep[:, :, None, :])
    out = spkv.reference_attention(q, k, v, spkv.hard_log_gate(p["logit"], p["tau"]), p["window"])
    close(out, dense_masked(q, k, v, allowed), TOL[q.dtype])


@given(problems(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_kept_set_only_shrinks_as_tau_grows(p, t1, t2):
    lo, hi = sorted((t1, t2))
    keep_lo, keep_hi = spkv.hard_keep(p["logit"], lo), spkv.hard_keep(p["logit"], hi)
    assert not (keep_hi & ~keep_lo).any()
    assert spkv.hard_keep(p["logit"], 0.0).all()  # tau = 0 keeps everything


@given(problems())
def test_anneal_endpoints_and_continuity(p):
    logit, tau = p["logit"], p["tau"]
    assert torch.equal(spkv.annealed_log_gate(logit, tau, 0.0), spkv.soft_log_gate(logit))
    assert torch.equal(spkv.annealed_log_gate(logit, tau, 1.0), spkv.hard_log_gate(logit, tau))
    # the formula itself approaches both ends: near a = 0 it is soft, near a = 1 kept keys are ~0
    # near a = 0, log u_tilde - log u = log(1 - a + a * keep / u): up to a / u for a kept key with a
    # small u (2e-5 at logit -10), plus rounding at the size of log u
    a, soft = 1e-9, spkv.soft_log_gate(logit)
    bound = a / torch.sigmoid(logit.double()) + 4 * torch.finfo(logit.dtype).eps * (1 + soft.double().abs())
    assert ((spkv.annealed_log_gate(logit, tau, a) - soft).double().abs() <= bound).all()
    near_hard = spkv.annealed_log_gate(logit, tau, 1 - 1e-9)
    keep = spkv.hard_keep(logit, tau)
    close(near_hard[keep], torch.zeros_like(near_hard[keep]), 1e-6)
    assert (near_hard[~keep] < -15).all()
    # and it is monotone in a for dropped keys: annealing only ever lowers their weight
    mid1, mid2 = spkv.annealed_log_gate(logit, tau, 0.3), spkv.annealed_log_gate(logit, tau, 0.6)
    assert (mid2[~keep] <= mid1[~keep] + 1e-12).all()


@given(problems())
def test_attention_under_annealed_view_matches_formula(p):
    """The annealed view is soft attention with u replaced by u_tilde (METHOD.md section 4)."""
    a = 0.4
    q, k, v, logit = p["q"], p["k"], p["v"], p["logit"]
    out = spkv.reference_attention(q, k, v, spkv.annealed_log_gate(logit, p["tau"], a), p["window"])
    u = torch.sigmoid(logit)
    u_tilde = (1 - a) * u + a * (u >= p["tau"]).to(u.dtype)
    ref = soft_formula(q, k, v, torch.logit(u_tilde.clamp(1e-300, 1 - 1e-16)), p["window"])
    close(out, ref, {torch.float64: 1e-9, torch.float32: 1e-4}[q.dtype])


@given(problems(), st.sampled_from(["soft", "hard", None]))
def test_sdpa_path_matches_reference_forward_and_backward(p, view):
    leaves = [p[n].clone().requires_grad_() for n in ("q", "k", "v", "logit")]
    grads = {}
    for impl in ("reference", "sdpa"):
        lg = None if view is None else spkv.annealed_log_gate(leaves[3], p["tau"], A[view])
        out = kernels.attention(*leaves[:3], lg, p["window"], impl)
        g = torch.autograd.grad(out.sum() + (out ** 2).mean(), leaves, allow_unused=True)
        grads[impl] = (out, g)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}[p["q"].dtype]
    close(grads["sdpa"][0], grads["reference"][0], tol)
    for a, b in zip(grads["sdpa"][1], grads["reference"][1]):
        if a is None or b is None:
            assert a is None and b is None or view != "soft"
            continue
        close(a, b, tol * 20)


@given(problems(max_t=300), st.sampled_from(["soft", "hard", None]))
def test_flex_eager_forward_matches_reference_fp32(p, view):
    q, k, v = (p[n].float() for n in ("q", "k", "v"))
    lg = None if view is None else spkv.annealed_log_gate(p["logit"].float(), p["tau"], A[view])
    ref = spkv.reference_attention(q, k, v, lg, p["window"])
    close(kernels.attention(q, k, v, lg, p["window"], "flex"), ref, 1e-5)


@pytest.mark.parametrize("B,Hkv,G,T,window", [(1, 2, 3, 256, 32), (2, 1, 1, 128, 200)])
def test_flex_compiled_forward_matches_reference_fp32(B, Hkv, G, T, window):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, Hkv * G, T, 16, generator=g)
    k, v = torch.randn(B, Hkv, T, 16, generator=g), torch.randn(B, Hkv, T, 16, generator=g)
    for lg in (spkv.soft_log_gate(3 * torch.randn(B, Hkv, T, generator=g)),
               spkv.hard_log_gate(3 * torch.randn(B, Hkv, T, generator=g), 0.5)):
        close(kernels.attention(q, k, v, lg, window, "flex_compiled"),
              spkv.reference_attention(q, k, v, lg, window), 1e-5)


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_flex_on_cuda_forward_backward_matches_reference(dtype, tol):
    B, Hkv, G, T, D, window = 2, 2, 3, 512, 64, 64
    g = torch.Generator(device="cuda").manual_seed(0)

    def make(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    base = [make(B, Hkv * G, T, D), make(B, Hkv, T, D), make(B, Hkv, T, D), 3 * make(B, Hkv, T)]
    results = {}
    for impl in ("reference", "flex_compiled", "flex_gategrad"):
        leaves = [x.clone().to(dtype if i < 3 else torch.float32).requires_grad_() for i, x in enumerate(base)]
        out = kernels.attention(*leaves[:3], spkv.soft_log_gate(leaves[3]), window, impl)
        out.float().square().mean().backward()
        results[impl] = [out.float()] + [x.grad.float() for x in leaves]
    for impl in ("flex_compiled", "flex_gategrad"):
        for a, b in zip(results[impl], results["reference"]):
            scale = b.abs().max().item() + 1e-6
            assert (a - b).abs().max().item() <= tol * scale, impl


@given(problems())
def test_density_counts_match_brute_force(p):
    keep = spkv.hard_keep(p["logit"], p["tau"])
    B, Hkv, S = keep.shape
    lengths = torch.randint(1, S + 1, (B,), generator=torch.Generator().manual_seed(S))
    kept, old = spkv.kept_counts(keep, p["window"], lengths)
    for h in range(Hkv):
        want_old = sum(1 for b in range(B) for s in range(S) if lengths[b] - 1 - s >= p["window"])
        want_kept = sum(int(keep[b, h, s]) for b in range(B) for s in range(S) if lengths[b] - 1 - s >= p["window"])
        assert (kept[h].item(), old[h].item()) == (want_kept, want_old)
    stats = spkv.density_stats({0: keep, 3: keep}, p["window"], lengths)
    if stats["old"]:
        assert stats["overall"] == pytest.approx(kept.sum().item() / old.sum().item())
        assert stats["per_layer"][3] == pytest.approx(stats["overall"])
    assert len(stats["per_head"][0]) == Hkv


def test_model_rejects_anneal_weight_outside_0_1():
    with pytest.raises(ValueError, match="outside"):
        GPT(tiny_config())(torch.zeros(1, 4, dtype=torch.long), a=1.5)


def test_predictor_starts_open_and_shape():
    pred = spkv.UtilityPredictor(n_embd=32, hidden=8, n_kv_head=3, init_bias=5.0)
    u = torch.sigmoid(pred(torch.randn(2, 7, 32)))  # (B, T, Hkv)
    assert u.shape == (2, 7, 3)
    close(u, torch.full_like(u, 1 / (1 + math.exp(-5))), 1e-6)


def test_gate_logits_are_fp32_under_bf16_autocast():
    """Under bf16 autocast the predictor still runs in fp32: the logits equal the fp32 ones exactly,
    so keep decisions near tau are the ones fp32 decoding makes."""
    from model import GPT
    from tiny import tiny_config

    torch.manual_seed(0)
    attn = GPT(tiny_config()).blocks[0].attn
    torch.nn.init.normal_(attn.predictor.proj.weight)
    x = torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attn.gate_logits(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, attn.predictor(x).transpose(1, 2))


def test_bf16_model_gates_are_its_weights_in_fp32():
    """A model cast to bf16 (how a GPU decodes) runs its predictor in fp32 on the bf16 weights: the
    logits are fp32 and equal those of an fp32 predictor holding the same (upcast) weights."""
    from model import GPT
    from tiny import tiny_config

    torch.manual_seed(0)
    attn = GPT(tiny_config()).blocks[0].attn
    torch.nn.init.normal_(attn.predictor.proj.weight)
    x = torch.randn(2, 16, 32).bfloat16()
    want = attn.to(torch.bfloat16).to(torch.float32).gate_logits(x.float())  # the bf16 weights, upcast
    got = attn.to(torch.bfloat16).gate_logits(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)


def test_training_forward_and_backward_under_cpu_bf16_autocast():
    """The training forward under bf16 autocast (the GPU recipe, here on CPU): the loss is finite and
    within bf16 rounding of fp32, the gates stay fp32, and the predictor gets a gradient."""
    from model import GPT
    from tiny import tiny_config

    torch.manual_seed(0)
    model = GPT(tiny_config(window=4))
    x = torch.randint(0, 257, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gates = []
        _, loss = model(x, x, a=0.0, gates=gates)
    want = model(x, x, a=0.0)[1]
    loss.backward()
    assert all(g.dtype == torch.float32 for g in gates)
    assert abs(loss.item() - want.item()) <= 2e-2 * want.item()
    assert all(b.attn.predictor.proj.weight.grad.abs().sum() > 0 for b in model.blocks)  # (fc: 0 at open init)


def test_rope_far_out_matches_a_float64_forward():
    """RoPE angles are formed in float64, so an fp32 forward at position 30,000 stays within fp32
    roundoff of a float64 forward of the same weights (fp32 angles there are off by ~1e-3 rad)."""
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=32768, n_embd=64, n_head=2, n_kv_head=1, rope_theta=500000.0)).eval()
    with torch.no_grad():  # large q.k scores, so attention (and the logits) feel every angle error
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name or "embed" in name:
                p.normal_(0, 1.0)
    idx = torch.randint(0, 257, (1, 16))
    pos = torch.arange(30000, 30016)
    with torch.no_grad():
        fp32 = model(idx, pos=pos, a=1.0)[0]
        fp64 = model.double()(idx, pos=pos, a=1.0)[0]
    assert (fp32.double() - fp64).abs().max().item() <= 1e-4


def test_the_causal_block_mask_is_built_once_per_forward_outside_the_blocks(monkeypatch):
    """GPT.forward builds the flex paths' BlockMask once and hands it to every layer; the
    attention of a layer builds none (so none is traced into a compiled block)."""
    from model import GPT
    from tiny import tiny_config
    built = []
    real = kernels.causal_block_mask.__wrapped__
    monkeypatch.setattr(kernels, "causal_block_mask", lambda T, device: built.append(T) or real(T, device))
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=3, window=4)).eval()
    x = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        want = model(x, a=0.5)[0]
        model.attn_impl = "flex"
        got = model(x, a=0.5)[0]
    assert built == [24]
    close(got, want, 1e-5)
