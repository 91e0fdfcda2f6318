"""The loss module: values, gradients, payloads, chunking and parameter errors (issue 2)."""

import math

import pytest
import torch

from csd_ray.losses import (
    HiddenTeacher,
    LossConfigError,
    LossInputError,
    TopKTeacher,
    available_losses,
    get_loss,
    topk_from_logits,
)

F64 = torch.float64
WEIGHTINGS = [("student", "student"), ("uniform", "student"), ("teacher", "student"), ("mix", "student")]


def _inputs(n=7, v=13, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=dtype) * 2
    t = torch.randn(n, v, generator=g, dtype=dtype) * 2
    mask = torch.ones(n, dtype=torch.bool)
    mask[1] = False
    return z, t, mask


def _weights_ref(kind, z, t, tau, alpha):
    """Independent float64 reference of the weight distributions."""
    z, t = z.double(), t.double()
    q, p = torch.softmax(z / tau, -1), torch.softmax(t / tau, -1)
    return {"student": q, "teacher": p, "uniform": torch.full_like(z, 1 / z.shape[1]), "mix": alpha * p + (1 - alpha) * q}[kind]


def _pairwise_ref(z, t, a, b):
    """¼ Σ_ij a_i b_j ((z_i − z_j) − (t_i − t_j))², literally O(V²), per row."""
    dz = z[:, :, None] - z[:, None, :]
    dt = t[:, :, None] - t[:, None, :]
    return 0.25 * (a[:, :, None] * b[:, None, :] * (dz - dt) ** 2).sum((1, 2))


def _grad(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    value, _ = fn(*xs)
    return value.detach(), torch.autograd.grad(value, xs)


@pytest.mark.parametrize("weights", WEIGHTINGS)
@pytest.mark.parametrize("tau", [0.7, 1.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_csd_value_and_gradient_match_closed_form(weights, tau, dtype):
    z, t, mask = _inputs(dtype=dtype)
    loss = get_loss("csd", weights=weights, temperature=tau, alpha=0.15)
    value, (grad,) = _grad(lambda z: loss(z, t, mask), z)

    a = _weights_ref(weights[0], z, t, tau, 0.15)
    b = _weights_ref(weights[1], z, t, tau, 0.15)
    zd, td = z.double(), t.double()
    m = mask.double()
    ref_value = (_pairwise_ref(zd, td, a, b) * m).sum() / m.sum()
    delta = zd - td
    ea = (a * delta).sum(-1, keepdim=True)
    eb = (b * delta).sum(-1, keepdim=True)
    ref_grad = 0.5 * (b * (delta - ea) + a * (delta - eb)) * m[:, None] / m.sum()

    tol = 1e-11 if dtype == F64 else 2e-6
    assert value.dtype == dtype
    assert value.item() == pytest.approx(ref_value.item(), rel=tol, abs=tol)
    assert torch.allclose(grad.double(), ref_grad, atol=tol, rtol=tol * 10)
    # The closed form is also the autograd gradient of the pairwise objective (weights held fixed).
    zz = zd.clone().requires_grad_(True)
    (pair_grad,) = torch.autograd.grad((_pairwise_ref(zz, td, a, b) * m).sum() / m.sum(), zz)
    assert torch.allclose(pair_grad, ref_grad, atol=1e-12)


def test_csd_student_student_at_tau_one_is_the_reverse_kl_gradient():
    z, t, mask = _inputs()
    _, (g_csd,) = _grad(lambda z: get_loss("csd")(z, t, mask), z)
    zz = z.clone().requires_grad_(True)
    log_q, log_p = torch.log_softmax(zz, -1), torch.log_softmax(t, -1)
    rkl = ((log_q.exp() * (log_q - log_p)).sum(-1) * mask).sum() / mask.sum()
    (g_rkl,) = torch.autograd.grad(rkl, zz)
    assert torch.allclose(g_csd, g_rkl, atol=1e-14)
    # ... and only there: another temperature or weighting gives a different gradient.
    _, (g_hot,) = _grad(lambda z: get_loss("csd", temperature=1.5)(z, t, mask), z)
    _, (g_ts,) = _grad(lambda z: get_loss("csd", weights=("teacher", "student"))(z, t, mask), z)
    assert (g_hot - g_rkl).abs().max() > 1e-3 and (g_ts - g_rkl).abs().max() > 1e-3


def test_forward_kl_gradient_is_q_minus_p():
    z, t, mask = _inputs()
    value, (grad,) = _grad(lambda z: get_loss("fkl")(z, t, mask), z)
    expected = (torch.softmax(z, -1) - torch.softmax(t, -1)) * mask[:, None] / mask.sum()
    assert torch.allclose(grad, expected, atol=1e-14)
    p = torch.softmax(t, -1)
    kl_ref = ((p * (p.log() - torch.log_softmax(z, -1))).sum(-1) * mask).sum() / mask.sum()
    assert value.item() == pytest.approx(kl_ref.item(), rel=1e-12)


def test_gjsd_endpoints_are_fkl_and_rkl_and_it_interpolates():
    z, t, mask = _inputs()
    fkl = get_loss("fkl")(z, t, mask)[0]
    rkl = get_loss("rkl")(z, t, mask)[0]
    assert get_loss("gjsd", beta=0.0)(z, t, mask)[0].item() == pytest.approx(fkl.item(), rel=1e-12)
    assert get_loss("gjsd", beta=1.0)(z, t, mask)[0].item() == pytest.approx(rkl.item(), rel=1e-12)
    # Symmetric JSD at β = ½ is bounded by log 2 and symmetric in (p, q).
    jsd = get_loss("gjsd", beta=0.5)
    assert 0 < jsd(z, t, mask)[0].item() < math.log(2)
    assert jsd(z, t, mask)[0].item() == pytest.approx(jsd(t, z, mask)[0].item(), rel=1e-12)


def test_baseline_values_against_direct_formulas():
    z, t, mask = _inputs()
    p, q = torch.softmax(t, -1), torch.softmax(z, -1)
    sel = mask.nonzero().squeeze(1)

    def avg(per_row):
        return per_row[sel].mean().item()

    lam = 0.1
    expected = {
        "tvd": avg(0.5 * (p - q).abs().sum(-1)),
        "sfkl": avg((p * (p / (lam * p + (1 - lam) * q)).log()).sum(-1)),
        "srkl": avg((q * (q / (lam * q + (1 - lam) * p)).log()).sum(-1)),
        "dld": avg(((z - t) ** 2).mean(-1)),
    }
    for name, ref in expected.items():
        assert get_loss(name)(z, t, mask)[0].item() == pytest.approx(ref, rel=1e-12), name


def test_shift_invariance_of_csd_but_not_dld():
    z, t, mask = _inputs()
    shift_z = torch.randn(z.shape[0], 1, dtype=F64) * 5
    shift_t = torch.randn(z.shape[0], 1, dtype=F64) * 5
    for weights in WEIGHTINGS:
        loss = get_loss("csd", weights=weights, temperature=0.7)
        v0, (g0,) = _grad(lambda z: loss(z, t, mask), z)
        v1, (g1,) = _grad(lambda z: loss(z, t + shift_t, mask), z + shift_z)
        assert v1.item() == pytest.approx(v0.item(), rel=1e-10)
        assert torch.allclose(g0, g1, atol=1e-12)
    dld = get_loss("dld")
    assert abs(dld(z + shift_z, t, mask)[0].item() - dld(z, t, mask)[0].item()) > 1.0


@pytest.mark.parametrize("name", ["csd", "fkl", "rkl", "gjsd", "sfkl", "srkl", "tvd"])
def test_topk_payload_with_k_equal_v_equals_dense(name):
    z, t, mask = _inputs()
    loss = get_loss(name)
    v_dense, (g_dense,) = _grad(lambda z: loss(z, t, mask), z)
    v_topk, (g_topk,) = _grad(lambda z: loss(z, topk_from_logits(t, k=t.shape[1]), mask), z)
    assert v_topk.item() == pytest.approx(v_dense.item(), rel=1e-12)
    assert torch.allclose(g_topk, g_dense, atol=1e-14)


def test_topk_payload_is_csd_restricted_to_the_index_set_merged_with_student_ids():
    z, t, mask = _inputs(v=20)
    k = 4
    student_top = z.topk(3, -1).indices
    payload = topk_from_logits(t, k=k, extra_ids=student_top)
    loss = get_loss("csd", weights=("teacher", "student"))
    value, (grad,) = _grad(lambda z: loss(z, payload, mask), z)
    # Reference: per row, CSD over the set (teacher top-k ∪ student top-3), computed densely.
    ref_total, ref_grad = 0.0, torch.zeros_like(z)
    for r in mask.nonzero().squeeze(1).tolist():
        ids = sorted(set(t[r].topk(k).indices.tolist()) | set(student_top[r].tolist()))
        zr = z[r, ids].clone().requires_grad_(True)
        v_r, _ = loss(zr[None], t[r, ids][None], torch.ones(1, dtype=torch.bool))
        (g_r,) = torch.autograd.grad(v_r, zr)
        ref_total += v_r.item()
        ref_grad[r, ids] = g_r
    n = mask.sum().item()
    assert value.item() == pytest.approx(ref_total / n, rel=1e-12)
    assert torch.allclose(grad, ref_grad / n, atol=1e-14)
    # Gradient lives on the index set only.
    outside = torch.ones_like(z, dtype=torch.bool)
    outside.scatter_(1, payload.ids, False)
    assert grad[outside].abs().max() == 0


@pytest.mark.parametrize("name", ["csd", "fkl", "dld"])
def test_hidden_payload_equals_dense(name):
    g = torch.Generator().manual_seed(3)
    z, _, mask = _inputs(v=17)
    hidden, head = torch.randn(7, 5, generator=g, dtype=F64), torch.randn(17, 5, generator=g, dtype=F64)
    loss = get_loss(name)
    v_dense, (g_dense,) = _grad(lambda z: loss(z, hidden @ head.t(), mask), z)
    v_hidden, (g_hidden,) = _grad(lambda z: loss(z, HiddenTeacher(hidden, head), mask), z)
    assert v_hidden.item() == pytest.approx(v_dense.item(), rel=1e-12)
    assert torch.allclose(g_hidden, g_dense, atol=1e-14)


def _linear_case(n=23, d=6, v=31, v_padded=36, seed=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.randn(v_padded, d, generator=g, dtype=F64) * 0.7
    bias = torch.randn(v_padded, generator=g, dtype=F64) * 0.1
    th = torch.randn(n, d + 2, generator=g, dtype=F64)
    tw = torch.randn(v_padded + 4, d + 2, generator=g, dtype=F64) * 0.7
    mask = torch.rand(n, generator=g) > 0.3
    return h, w, bias, th, tw, mask, v


# dld refuses top-k log-probs (see test_shape_mismatches_raise_clear_errors).
# Losses on the response tokens (ce, mix) need targets: tests/test_losses_lm.py covers them.
FUSED_CASES = [(n, p) for n in available_losses() for p in ("logits", "hidden", "topk")
               if (n, p) != ("dld", "topk") and n not in ("ce", "mix")]


@pytest.mark.parametrize("name, payload", FUSED_CASES)
def test_fused_equals_dense_for_values_and_gradients(name, payload):
    h, w, bias, th, tw, mask, v = _linear_case()
    teacher_logits = th @ tw.t()
    teacher = {
        "logits": teacher_logits,
        "hidden": HiddenTeacher(th, tw),
        "topk": topk_from_logits(teacher_logits[:, :v], k=5, extra_ids=(h @ w[:v].t()).topk(3, -1).indices),
    }[payload]
    fused = get_loss(name, vocab_size=v, chunk_size=4)  # 4 does not divide the 16-odd selected rows
    dense = get_loss(name, vocab_size=v, chunk_size=10_000)
    v_f, g_f = _grad(lambda h, w, b: fused.fused(h, w, teacher, mask, student_bias=b), h, w, bias)
    v_d, g_d = _grad(lambda h, w, b: dense(h @ w.t() + b, teacher, mask), h, w, bias)
    assert v_f.item() == pytest.approx(v_d.item(), rel=1e-12, abs=1e-14)
    for a, b, what in zip(g_f, g_d, ["hidden", "lm_head", "bias"]):
        assert torch.allclose(a, b, atol=1e-12), what


def test_fused_float32_and_bfloat16_inputs_are_computed_in_fp32():
    h, w, _, th, tw, mask, v = _linear_case()
    ref, _ = get_loss("csd", vocab_size=v).fused(h, w, HiddenTeacher(th, tw), mask)
    h32, w32 = h.float(), w.float()
    v32, _ = get_loss("csd", vocab_size=v).fused(h32, w32, HiddenTeacher(th.float(), tw.float()), mask)
    assert v32.dtype == torch.float32 and v32.item() == pytest.approx(ref.item(), rel=1e-5)
    # bf16 in: the result equals the fp32 computation on the same (bf16-rounded) numbers.
    z16 = (h @ w.t()).bfloat16()
    t16 = (th @ tw.t()).bfloat16()
    loss = get_loss("csd", vocab_size=v)
    v16, (g16,) = _grad(lambda z: loss(z, t16, mask), z16)
    v_ref, _ = loss(z16.float(), t16.float(), mask)
    assert v16.dtype == torch.float32 and g16.dtype == torch.bfloat16
    assert v16.item() == pytest.approx(v_ref.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["csd", "fkl"])
def test_fused_path_does_its_math_in_fp32_for_bfloat16_inputs(name):
    """bf16 hidden states and lm_head: value and gradients equal the fp32 computation on the same
    (bf16-representable) numbers; bf16 logits would be ~1e-2 off."""
    h, w, _, th, tw, mask, v = _linear_case()
    h16, w16, th16, tw16 = (x.bfloat16() for x in (h * 3, w, th * 3, tw))
    loss = get_loss(name, vocab_size=v, chunk_size=4)
    v16, (gh16, gw16) = _grad(lambda h, w: loss.fused(h, w, HiddenTeacher(th16.float(), tw16.float()), mask), h16, w16)
    v32, (gh32, gw32) = _grad(lambda h, w: loss.fused(h, w, HiddenTeacher(th16.float(), tw16.float()), mask),
                              h16.float(), w16.float())
    assert v16.dtype == torch.float32 and gh16.dtype == torch.bfloat16 and gw16.dtype == torch.bfloat16
    assert v16.item() == pytest.approx(v32.item(), rel=1e-6)
    # Gradients come back in bf16: equal to the fp32 gradients rounded once.
    assert torch.equal(gh16, gh32.bfloat16()) and torch.equal(gw16, gw32.bfloat16())


def test_masked_positions_and_padded_vocabulary_contribute_nothing():
    z, t, mask = _inputs(v=10)
    loss = get_loss("csd", weights=("uniform", "student"), vocab_size=10)
    v0, (g0,) = _grad(lambda z: loss(z, t, mask), z)
    # Garbage in masked rows and in padded vocabulary columns changes nothing.
    z_bad, t_bad = z.clone(), t.clone()
    z_bad[~mask] = 1e4
    t_bad[~mask] = float("nan")
    z_pad = torch.cat([z_bad, torch.full((z.shape[0], 6), 50.0, dtype=F64)], 1)
    t_pad = torch.cat([t_bad, torch.full((z.shape[0], 6), -30.0, dtype=F64)], 1)
    v1, (g1,) = _grad(lambda z: loss(z, t_pad, mask), z_pad)
    assert v1.item() == pytest.approx(v0.item(), rel=1e-13)
    assert torch.allclose(g1[:, :10], g0, atol=1e-15)
    assert g1[:, 10:].abs().max() == 0 and g1[~mask].abs().max() == 0


# Every loss, CSD under each weighting: a -inf logit (teacher or student side) is no vocabulary entry.
MINUS_INF_CASES = [
    pytest.param(name, weights, side, id=f"{side}-{name}" + (f"-{weights[0]}" if weights else ""))
    for side in ("teacher", "student")
    for name, weights in [("csd", w) for w in WEIGHTINGS] + [(n, None) for n in available_losses() if n not in ("csd", "ce", "mix")]
]  # ce and mix (targets, terms) are checked in tests/test_losses_lm.py


@pytest.mark.parametrize("name, weights, side", MINUS_INF_CASES)
def test_minus_inf_logits_are_excluded_from_sums_and_weights(name, weights, side):
    z, t, mask = _inputs(v=12)
    banned = torch.zeros_like(t, dtype=torch.bool)
    banned[:, [2, 7]] = True
    loss = get_loss(name, weights=weights, alpha=0.15) if weights else get_loss(name)
    if side == "teacher":
        value, (grad,) = _grad(lambda z: loss(z, t.masked_fill(banned, float("-inf")), mask), z)
    else:
        value, (grad,) = _grad(lambda z: loss(z.masked_fill(banned, float("-inf")), t, mask), z)
    keep = [i for i in range(12) if i not in (2, 7)]
    ref, (ref_grad,) = _grad(lambda zk: loss(zk, t[:, keep], mask), z[:, keep])
    assert math.isfinite(value.item()) and value.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(grad[:, keep], ref_grad, atol=1e-14)
    assert grad[:, [2, 7]].abs().max() == 0


def _restricted_ref(name, z, t, lam=0.1, beta=0.5):
    """Independent per-row reference of a KL-type loss on an index set: both sides renormalised there."""
    log_p, log_q = torch.log_softmax(t, -1), torch.log_softmax(z, -1)
    p, q = log_p.exp(), log_q.exp()
    if name == "fkl":
        return (p * (log_p - log_q)).sum(-1)
    if name == "rkl":
        return (q * (log_q - log_p)).sum(-1)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "sfkl":
        return (p * (p / (lam * p + (1 - lam) * q)).log()).sum(-1)
    if name == "srkl":
        return (q * (q / (lam * q + (1 - lam) * p)).log()).sum(-1)
    m = beta * p + (1 - beta) * q  # gjsd
    return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)


@pytest.mark.parametrize("name", ["fkl", "rkl", "gjsd", "sfkl", "srkl", "tvd"])
def test_topk_payload_renormalises_both_distributions_over_the_index_set(name):
    z, t, mask = _inputs(v=20)
    k = 5
    payload = topk_from_logits(t, k=k)  # teacher log-probs: their mass on the set is < 1
    assert (payload.logprobs.exp().sum(-1) < 0.99).all()
    value, _ = get_loss(name)(z, payload, mask)
    ids = payload.ids
    per_row = _restricted_ref(name, z.gather(1, ids), t.gather(1, ids))
    assert value.item() == pytest.approx(per_row[mask].mean().item(), rel=1e-12)


def test_float_mask_weights_tokens_and_normalizer_overrides_count():
    z, t, _ = _inputs()
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0, 1.0, 3.0], dtype=F64)
    loss = get_loss("csd")
    per_row = torch.stack([loss(z[i : i + 1], t[i : i + 1], torch.ones(1))[0] for i in range(7)])
    value, metrics = loss(z, t, weights)
    assert value.item() == pytest.approx((weights * per_row).sum().item() / 6, rel=1e-12)
    assert metrics["tokens"] == 6 and metrics["loss"] == pytest.approx(value.item())
    assert loss(z, t, weights, normalizer=12.0)[0].item() == pytest.approx(value.item() / 2, rel=1e-12)


def _train_gaussian_student(weights, steps=300):
    """A unimodal student (Gaussian over ordered tokens, in logit space) fitted to a bimodal teacher."""
    pos = torch.arange(40, dtype=F64)
    mixture = 0.5 * torch.exp(-((pos - 10) ** 2) / 8) + 0.5 * torch.exp(-((pos - 30) ** 2) / 8)
    teacher = torch.log(mixture)[None]
    mu = torch.tensor(26.0, dtype=F64, requires_grad=True)
    log_sigma = torch.tensor(math.log(3.0), dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([mu, log_sigma], lr=0.05)
    loss = get_loss("csd", weights=weights)
    for _ in range(steps):
        z = (-((pos - mu) ** 2) / (2 * log_sigma.exp() ** 2))[None]
        value, _ = loss(z, teacher, torch.ones(1, dtype=torch.bool))
        opt.zero_grad()
        value.backward()
        opt.step()
    q = torch.softmax(z.detach()[0], -1)
    entropy = -(q * q.clamp_min(1e-300).log()).sum().item()
    return q[:20].sum().item(), q[20:].sum().item(), entropy


def test_mode_seeking_student_student_versus_mode_covering_teacher_student():
    left_ss, right_ss, entropy_ss = _train_gaussian_student(("student", "student"))
    left_ts, right_ts, entropy_ts = _train_gaussian_student(("teacher", "student"))
    assert max(left_ss, right_ss) > 0.99  # (S,S) collapses onto one mode
    assert min(left_ts, right_ts) > 0.3  # (T,S) puts real mass on both
    assert entropy_ts > entropy_ss + 1.0


@pytest.mark.parametrize(
    "name, params, key",
    [
        ("cds", {}, "unknown loss 'cds'; did you mean 'csd'"),
        ("csd", {"weights": ("student", "teachr")}, "unknown weighting 'teachr'"),
        ("csd", {"weights": "student"}, "'weights' must be a pair"),
        ("csd", {"alpha": 1.5}, "'alpha' must be in [0, 1], got 1.5"),
        ("csd", {"temperature": 0}, "'temperature' must be > 0, got 0"),
        ("fkl", {"temperature": -1.0}, "'temperature' must be > 0"),
        ("gjsd", {"beta": 2}, "'beta' must be in [0, 1]"),
        ("sfkl", {"skew": 1.0}, "'skew' must be in (0, 1)"),
        ("fkl", {"beta": 0.5}, "unknown parameter 'beta'"),
        ("csd", {"vocab_size": 0}, "'vocab_size' must be a positive integer"),
        ("csd", {"chunk_size": -4}, "'chunk_size' must be a positive integer"),
    ],
)
def test_invalid_parameters_raise_one_clear_error(name, params, key):
    with pytest.raises(LossConfigError) as err:
        get_loss(name, **params)
    assert key in str(err.value)


def test_shape_mismatches_raise_clear_errors():
    z, t, mask = _inputs()
    loss = get_loss("csd")
    with pytest.raises(LossInputError, match="13 vocabulary columns but the teacher's have 12.*vocab_size"):
        loss(z, t[:, :12], mask)
    with pytest.raises(LossInputError, match=r"mask must be \[N\] with N=7"):
        loss(z, t, mask[:5])
    with pytest.raises(LossInputError, match="teacher has 6 rows but the student has 7"):
        loss(z, t[:6], mask)
    with pytest.raises(LossInputError, match=r"student_logits must be \[N, V\]"):
        loss(z[None], t, mask)
    with pytest.raises(LossInputError, match="d=6 but student_lm_head has d=5"):
        loss.fused(torch.zeros(7, 6), torch.zeros(13, 5), t, mask)
    with pytest.raises(LossInputError, match="ids and logprobs must both be"):
        TopKTeacher(torch.zeros(7, 3, dtype=torch.long), torch.zeros(7, 4))
    with pytest.raises(LossInputError, match="dld compares raw logits.*'topk' payload"):
        get_loss("dld")(z, topk_from_logits(t, 3), mask)


def test_dld_gradient_is_finite_where_a_logit_is_minus_inf():
    z, t, mask = _inputs(dtype=torch.float32)
    t[0, 3] = float("-inf")
    z = z.clone().requires_grad_(True)
    value, _ = get_loss("dld")(z, t, mask)
    (grad,) = torch.autograd.grad(value, z)
    assert torch.isfinite(grad).all() and grad[0, 3] == 0


def test_a_second_backward_through_a_retained_graph_adds_the_same_gradient():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(11, 8, generator=g, requires_grad=True)
    value, _ = get_loss("csd")(h @ w.t(), torch.randn(6, 11, generator=g), torch.ones(6, dtype=torch.bool))
    value.backward(retain_graph=True)
    first = h.grad.clone()
    value.backward()
    assert torch.allclose(h.grad, 2 * first)
    fused, _ = get_loss("csd").fused(h, w, torch.randn(6, 11, generator=g), torch.ones(6, dtype=torch.bool))
    h.grad = None
    fused.backward(retain_graph=True)
    once = h.grad.clone()
    (fused * 3).backward()
    assert torch.allclose(h.grad, 4 * once)


# ---- edges the mutation run (README, "Mutation testing") showed unguarded --------------------------
def test_csd_autograd_reference_path_equals_the_closed_form():
    """CSDLoss.token_loss (the plain autograd formula) and token_loss_and_grad agree row by row."""
    z, t, _ = _inputs()
    valid = torch.ones_like(z, dtype=torch.bool)
    valid[0, 3] = False
    for weights in WEIGHTINGS:
        loss = get_loss("csd", weights=weights, temperature=0.8, alpha=0.3)
        per_row, grad = loss.token_loss_and_grad(z, t, valid)
        zz = z.clone().requires_grad_(True)
        auto = loss.token_loss(zz, t, valid)
        (auto_grad,) = torch.autograd.grad(auto.sum(), zz)
        assert torch.allclose(auto, per_row, atol=1e-12) and torch.allclose(auto_grad, grad, atol=1e-12), weights


def test_describe_bytes_per_token_and_chunk_rows():
    assert get_loss("csd").describe() == "csd(weights=('student', 'student'), alpha=0.5, temperature=1.0)"
    assert get_loss("gjsd", beta=0.25).describe() == "gjsd(temperature=1.0, beta=0.25)"
    from csd_ray.losses.signals import DenseTeacher

    assert DenseTeacher(torch.zeros(3, 10)).bytes_per_token() == 40
    assert TopKTeacher(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4)).bytes_per_token() == 4 * (8 + 4)
    assert HiddenTeacher(torch.zeros(3, 6, dtype=torch.bfloat16), torch.zeros(10, 6)).bytes_per_token() == 12
    assert get_loss("csd", chunk_size=3).chunk_rows(100) == 3
    assert get_loss("csd").chunk_rows(49152) == (1 << 23) // 49152 and get_loss("csd").chunk_rows(1) == 1 << 23
    assert get_loss("csd").chunk_rows(1 << 24) == 1


def test_error_messages_name_what_is_accepted():
    with pytest.raises(LossConfigError, match=r"^csd: unknown parameter 'foo'; accepted: alpha, temperature, weights$"):
        get_loss("csd", foo=1)
    with pytest.raises(LossConfigError, match=r"^dld: unknown parameter 'foo'; accepted: none besides vocab_size and chunk_size$"):
        get_loss("dld", foo=1)
    names = "ce, csd, dld, fkl, gjsd, mix, rkl, sfkl, srkl, tvd"
    with pytest.raises(LossConfigError, match=rf"^unknown loss 'zzzz' \(available: {names}\)$"):
        get_loss("zzzz")
    with pytest.raises(LossConfigError, match=rf"^unknown loss 'cds'; did you mean 'csd'\? \(available: {names}\)$"):
        get_loss("cds")
    with pytest.raises(LossConfigError, match=r"unknown weighting 'x' in 'weights'; expected one of student, teacher, uniform, mix"):
        get_loss("csd", weights=("x", "student"))
    from csd_ray.losses.registry import register_loss

    with pytest.raises(ValueError, match="loss 'csd' registered twice"):
        register_loss("csd")(type("Again", (), {}))
    assert get_loss("tvd").name == "tvd"


@pytest.mark.parametrize("name, params, ok", [
    ("csd", {"vocab_size": 1}, True), ("csd", {"chunk_size": 1}, True), ("csd", {"chunk_size": 0}, False),
    ("csd", {"alpha": 0.0}, True), ("csd", {"alpha": 1.0}, True), ("csd", {"weights": "ts"}, False),
    ("fkl", {"temperature": 0.0}, False), ("sfkl", {"skew": 0.0}, False), ("srkl", {"skew": 0.999}, True),
])
def test_parameter_boundaries(name, params, ok):
    if ok:
        get_loss(name, **params)
    else:
        with pytest.raises(LossConfigError):
            get_loss(name, **params)


def test_shape_errors_name_the_shapes():
    loss = get_loss("csd")
    mask = torch.ones(7, dtype=torch.bool)
    with pytest.raises(LossInputError, match=r"student_hidden must be \[N, d\] and student_lm_head \[V, d\]; got \(7, 6, 1\) and \(13, 6\)"):
        loss.fused(torch.zeros(7, 6, 1), torch.zeros(13, 6), torch.zeros(7, 13), mask)
    with pytest.raises(LossInputError, match=r"got \(7, 6\) and \(13, 6, 1\)"):
        loss.fused(torch.zeros(7, 6), torch.zeros(13, 6, 1), torch.zeros(7, 13), mask)
    with pytest.raises(LossInputError, match=r"got hidden \(7, 6, 1\) and lm_head \(13, 6\)"):
        HiddenTeacher(torch.zeros(7, 6, 1), torch.zeros(13, 6))
    with pytest.raises(LossInputError, match=r"got hidden \(7, 6\) and lm_head \(13, 6, 1\)"):
        HiddenTeacher(torch.zeros(7, 6), torch.zeros(13, 6, 1))
    with pytest.raises(LossInputError, match=r"teacher logits must be \[N, V\]; got shape \(7,\)"):
        loss(torch.zeros(7, 13), torch.zeros(7), mask)
    with pytest.raises(LossInputError, match="got str"):
        loss(torch.zeros(7, 13), "logits", mask)
    with pytest.raises(LossInputError, match=r"vocab_size=10 but student logits have 12 and teacher logits 8 columns"):
        get_loss("csd", vocab_size=10)(torch.zeros(7, 12), torch.zeros(7, 8), mask)
    with pytest.raises(LossInputError, match="normalizer must be positive, got 0"):
        loss(torch.zeros(7, 13), torch.zeros(7, 13), torch.eye(7)[0].bool(), normalizer=0)
    value, _ = loss(torch.zeros(7, 13), torch.zeros(7, 13), torch.zeros(7, dtype=torch.bool), normalizer=0)
    assert value.item() == 0  # nothing selected: nothing to divide


def test_fused_normalizer_and_hidden_teacher_bias():
    h, w, bias, th, tw, mask, v = _linear_case()
    loss = get_loss("fkl", vocab_size=v)
    tbias = torch.linspace(-1, 1, tw.shape[0], dtype=F64)
    teacher = HiddenTeacher(th, tw, tbias)
    plain, _ = loss.fused(h, w, teacher, mask)
    assert loss.fused(h, w, teacher, mask, normalizer=2 * mask.sum().item())[0].item() == pytest.approx(plain.item() / 2)
    assert plain.item() == pytest.approx(loss(h @ w.t(), th @ tw.t() + tbias, mask)[0].item(), rel=1e-12)


def test_topk_padding_slots_and_ids_beyond_the_vocabulary_take_no_part():
    z, t, mask = _inputs(v=12)
    ids = torch.tensor([[11, 0, 5]] * 7)  # 11 = the last real column
    lp = torch.log_softmax(t, -1).gather(1, ids)
    ref, (ref_grad,) = _grad(lambda z: get_loss("fkl", vocab_size=12)(z, TopKTeacher(ids, lp), mask), z)
    padded_ids = torch.cat([ids, torch.tensor([[-1, 12, 11]] * 7)], 1)  # -inf padding, a padded-vocab id, -inf slot
    padded_lp = torch.cat([lp, torch.tensor([[float("-inf"), 0.0, float("-inf")]] * 7)], 1)
    zp = torch.cat([z, torch.full((7, 2), 3.0, dtype=F64)], 1)  # logits padded to 14 columns
    for student in ("logits", "fused"):
        loss = get_loss("fkl", vocab_size=12)
        payload = TopKTeacher(padded_ids, padded_lp)
        if student == "logits":
            value, (grad,) = _grad(lambda z: loss(z, payload, mask), zp)
            assert torch.allclose(grad[:, :12], ref_grad, atol=1e-14) and grad[:, 12:].abs().max() == 0
        else:  # identity lm_head: hidden states are the logits
            value, _ = loss.fused(zp, torch.eye(14, dtype=F64), payload, mask)
        assert value.item() == pytest.approx(ref.item(), rel=1e-12), student


def test_topk_from_logits_dtypes_and_duplicate_extra_ids():
    t = torch.randn(2, 9, dtype=torch.bfloat16)
    assert topk_from_logits(t, 3).logprobs.dtype == torch.float32
    assert topk_from_logits(t.float(), 3).logprobs.dtype == torch.float32
    assert topk_from_logits(t.double(), 3).logprobs.dtype == torch.float64
    t = torch.arange(9, dtype=F64).repeat(2, 1)  # top-2 = ids 8, 7
    extra = torch.tensor([[1, 1, 2, 8, 2, -1], [3, 4, 3, 3, 5, 0]])
    out = topk_from_logits(t, 2, extra_ids=extra)
    kept = torch.isfinite(out.logprobs[:, 2:])
    assert kept.tolist() == [[True, False, True, False, False, False], [True, True, False, False, True, True]]
    assert torch.allclose(out.logprobs[:, :2].exp().sum(-1), torch.softmax(t, -1)[:, 7:].sum(-1))


def test_single_valid_entry_rows_and_temperature_of_divergences():
    z, t, mask = _inputs(v=6)
    only = torch.zeros_like(z, dtype=torch.bool)
    only[:, 2] = True
    lone = z.masked_fill(~only, float("-inf"))
    v, (g,) = _grad(lambda z: get_loss("csd", weights=("uniform", "student"))(z, t, mask), lone)
    assert v.item() == 0 and g.abs().max() == 0  # one entry: no differences to match
    dld, _ = get_loss("dld")(lone, t, mask)
    assert dld.item() == pytest.approx(((z[:, 2] - t[:, 2]) ** 2)[mask].mean().item(), rel=1e-12)
    p, q = torch.softmax(t / 2, -1), torch.softmax(z / 2, -1)
    ref = (p * (p.log() - q.log())).sum(-1)[mask].mean()
    assert get_loss("fkl", temperature=2.0)(z, t, mask)[0].item() == pytest.approx(ref.item(), rel=1e-12)


def test_fused_topk_without_a_bias_and_bf16_topk():
    h, w, _, th, tw, mask, v = _linear_case()
    payload = topk_from_logits((th @ tw.t())[:, :v], k=5)
    value, _ = get_loss("csd", vocab_size=v).fused(h, w, payload, mask)
    assert value.item() == pytest.approx(get_loss("csd", vocab_size=v)(h @ w.t(), payload, mask)[0].item(), rel=1e-12)
    h16, w16 = h.bfloat16(), w.bfloat16()
    v16, _ = get_loss("csd", vocab_size=v).fused(h16, w16, payload, mask)
    v32, _ = get_loss("csd", vocab_size=v).fused(h16.float(), w16.float(), payload, mask)
    assert v16.item() == pytest.approx(v32.item(), rel=1e-6)


# Issue 13: chunks whose logits are all finite take each loss's closed-form fast path
# (fast_loss_and_grad); it must equal the general masked path (autograd for most baselines).
FAST_CASES = [("csd", {"weights": w, "alpha": 0.15, "temperature": tau}) for w in WEIGHTINGS + [("student", "teacher"), ("uniform", "uniform")]
              for tau in (1.0, 1.7)]
FAST_CASES += [(n, {"temperature": tau}) for n in ("fkl", "rkl", "sfkl", "srkl", "tvd") for tau in (1.0, 0.6)]
FAST_CASES += [("gjsd", {"beta": b, "temperature": 1.3}) for b in (0.0, 0.3, 1.0)] + [("dld", {}), ("ce", {})]
FAST_CASES += [("mix", {"terms": [{"name": "csd", "params": {"weights": ["teacher", "student"]}}, {"name": "ce", "weight": 0.1}]})]


@pytest.mark.parametrize("name, params", FAST_CASES, ids=lambda x: x if isinstance(x, str) else "-".join(map(str, x.values()))[:40])
def test_fast_path_equals_the_general_path(name, params):
    z, t, _ = _inputs(n=6, v=11)
    t = t + 5.0  # teacher and student at different offsets, as log-probs against logits are
    loss = get_loss(name, **params)
    target_ids = torch.tensor([0, 3, 10, 5, 5, 1])
    target = torch.zeros_like(z, dtype=torch.bool)
    target[torch.arange(6), target_ids] = True
    fast = loss.fast_loss_and_grad(z.clone(), t.clone(), target_ids if loss.uses_targets else None)
    assert fast is not None, f"{name} has no fast path"
    valid = torch.ones_like(z, dtype=torch.bool)
    ref = loss.token_loss_and_grad(z, t, valid, *((target,) if loss.uses_targets else ()))
    assert torch.allclose(fast[0], ref[0], rtol=1e-12, atol=1e-14)
    assert torch.allclose(fast[1], ref[1], rtol=1e-12, atol=1e-14)


def test_a_chunk_with_an_excluded_entry_takes_the_general_path_and_the_rest_the_fast_one():
    """Same rows in one chunk or in chunks of one: a -inf logit in row 2 sends only its chunk to
    the masked path; the value and gradient do not depend on which rows share a chunk."""
    z, t, mask = _inputs(n=6, v=11)
    t[2, 4] = float("-inf")
    for name, params in [("csd", {"weights": ("teacher", "student")}), ("fkl", {}), ("dld", {})]:
        per_row, (g1,) = _grad(lambda z: get_loss(name, chunk_size=1, **params)(z, t, mask), z)
        whole, (g6,) = _grad(lambda z: get_loss(name, chunk_size=6, **params)(z, t, mask), z)
        assert math.isfinite(whole.item()) and whole.item() == pytest.approx(per_row.item(), rel=1e-12)
        assert torch.allclose(g1, g6, atol=1e-14) and g6[2, 4] == 0


def test_malloc_tuning_runs_once_and_respects_the_opt_out():
    """glibc keeps freed chunk buffers (issue 13) unless CSD_RAY_MALLOC_TUNE=0 or MALLOC_*_ is set."""
    import os
    import subprocess
    import sys

    code = "from csd_ray.losses.base import keep_chunk_buffers_in_the_heap as k; print(k(), k())"
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "CSD_RAY_MALLOC_TUNE"}
    runs = {}
    for name, extra in [("default", {}), ("opt_out", {"CSD_RAY_MALLOC_TUNE": "0"}), ("user", {"MALLOC_TRIM_THRESHOLD_": "0"})]:
        out = subprocess.run([sys.executable, "-c", code], env={**base, **extra}, capture_output=True, text=True, check=True)
        runs[name] = out.stdout.split()
    assert runs["default"] == ["True", "False"]  # glibc accepted it, and only once
    assert runs["opt_out"] == ["False", "False"] and runs["user"] == ["False", "False"]
