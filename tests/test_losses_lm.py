"""Cross-entropy on response tokens and mixtures of losses, behind the loss interface (issue 12)."""

import pytest
import torch

from csd_ray.losses import HiddenTeacher, LossConfigError, LossInputError, get_loss, topk_from_logits

F64 = torch.float64


def _case(n=9, v=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g, dtype=F64) * 2
    t = torch.randn(n, v, generator=g, dtype=F64) * 2
    targets = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) * 2  # float mask: per-token weights
    mask[2] = 0.0
    return z, t, targets, mask


def _grad(fn, *xs):
    xs = [x.detach().clone().requires_grad_(True) for x in xs]
    value, _ = fn(*xs)
    return value.detach(), torch.autograd.grad(value, xs)


def _ce_ref(z, targets, mask):
    """Weighted mean over selected rows of −log softmax(z)[target], by torch's own cross_entropy."""
    per_row = torch.nn.functional.cross_entropy(z, targets, reduction="none")
    return (per_row * mask).sum() / (mask > 0).sum()


def test_ce_value_and_gradient_match_torch_cross_entropy():
    z, t, targets, mask = _case()
    value, (grad,) = _grad(lambda z: get_loss("ce")(z, t, mask, targets=targets), z)
    ref_value, (ref_grad,) = _grad(lambda z: (_ce_ref(z, targets, mask), None), z)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-12)
    assert torch.allclose(grad, ref_grad, atol=1e-14)
    # Closed form q − onehot, scaled by each row's weight over the selected-row count.
    q = torch.softmax(z, -1)
    expected = (q - torch.nn.functional.one_hot(targets, z.shape[1])) * (mask / (mask > 0).sum())[:, None]
    assert torch.allclose(grad, expected, atol=1e-14)


def test_ce_ignores_the_teacher_and_padded_vocabulary():
    z, t, targets, mask = _case(v=10)
    loss = get_loss("ce", vocab_size=10)
    v0, (g0,) = _grad(lambda z: loss(z, t, mask, targets=targets), z)
    z_pad = torch.cat([z, torch.full((z.shape[0], 6), 40.0, dtype=F64)], 1)
    t_other = torch.randn(z.shape[0], 16, dtype=F64)
    v1, (g1,) = _grad(lambda z: loss(z, t_other, mask, targets=targets), z_pad)
    assert v1.item() == pytest.approx(v0.item(), rel=1e-13)
    assert torch.allclose(g1[:, :10], g0, atol=1e-15) and g1[:, 10:].abs().max() == 0


@pytest.mark.parametrize("name", ["ce", "mix"])
def test_fused_equals_dense_with_targets(name):
    g = torch.Generator().manual_seed(5)
    n, d, v, v_padded = 23, 6, 31, 36
    h, w = torch.randn(n, d, generator=g, dtype=F64), torch.randn(v_padded, d, generator=g, dtype=F64) * 0.7
    bias = torch.randn(v_padded, generator=g, dtype=F64) * 0.1
    th, tw = torch.randn(n, d + 2, generator=g, dtype=F64), torch.randn(v_padded, d + 2, generator=g, dtype=F64)
    mask = torch.rand(n, generator=g) > 0.3
    targets = torch.randint(0, v, (n,), generator=g)
    params = {"terms": [{"name": "csd", "params": {"weights": ["teacher", "student"]}}, {"name": "ce", "weight": 0.3}]}
    kw = params if name == "mix" else {}
    fused, dense = get_loss(name, vocab_size=v, chunk_size=4, **kw), get_loss(name, vocab_size=v, chunk_size=10_000, **kw)
    teacher = HiddenTeacher(th, tw)
    v_f, g_f = _grad(lambda h, w, b: fused.fused(h, w, teacher, mask, student_bias=b, targets=targets), h, w, bias)
    v_d, g_d = _grad(lambda h, w, b: dense(h @ w.t() + b, th @ tw.t(), mask, targets=targets), h, w, bias)
    assert v_f.item() == pytest.approx(v_d.item(), rel=1e-12)
    for a, b in zip(g_f, g_d):
        assert torch.allclose(a, b, atol=1e-12)


def _pairwise_csd_ref(z, t, a, b):
    dz, dt = z[:, :, None] - z[:, None, :], t[:, :, None] - t[:, None, :]
    return 0.25 * (a[:, :, None] * b[:, None, :] * (dz - dt) ** 2).sum((1, 2))


def test_mix_is_the_weighted_sum_of_its_terms_against_brute_force():
    z, t, targets, mask = _case()
    loss = get_loss("mix", terms=[{"name": "csd", "weight": 1.0, "params": {"weights": ["teacher", "student"]}},
                                  {"name": "ce", "weight": 0.25}])
    value, (grad,) = _grad(lambda z: loss(z, t, mask, targets=targets), z)

    def reference(z):
        a, b = torch.softmax(t, -1), torch.softmax(z.detach(), -1)  # CSD weights are stop-gradient
        csd = (_pairwise_csd_ref(z, t, a, b) * mask).sum() / (mask > 0).sum()
        return csd + 0.25 * _ce_ref(z, targets, mask), None

    ref_value, (ref_grad,) = _grad(reference, z)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-12)
    assert torch.allclose(grad, ref_grad, atol=1e-13)


def test_mix_without_a_target_loss_needs_no_targets_and_keeps_shift_flags():
    z, t, _, mask = _case()
    mix = get_loss("mix", terms=[{"name": "fkl", "weight": 0.5}, {"name": "rkl", "weight": 0.5}])
    value, _ = mix(z, t, mask)
    half = 0.5 * get_loss("fkl")(z, t, mask)[0] + 0.5 * get_loss("rkl")(z, t, mask)[0]
    assert value.item() == pytest.approx(half.item(), rel=1e-12)
    assert mix.shift_invariant and not mix.uses_targets
    assert not get_loss("mix", terms=[{"name": "dld"}, {"name": "ce"}]).shift_invariant


def test_target_losses_refuse_topk_payloads_and_missing_targets():
    z, t, targets, mask = _case()
    with pytest.raises(LossInputError, match="ce needs targets="):
        get_loss("ce")(z, t, mask)
    with pytest.raises(LossInputError, match="ce normalises the student over the whole vocabulary.*'topk'"):
        get_loss("ce")(z, topk_from_logits(t, 3), mask, targets=targets)
    with pytest.raises(LossInputError, match=r"targets must be \[N\] integer token ids with N=9"):
        get_loss("ce")(z, t, mask, targets=targets[:4])
    with pytest.raises(LossInputError, match="target token 20 is outside the valid vocabulary"):
        get_loss("ce")(z, t, mask, targets=torch.full((9,), 20))


@pytest.mark.parametrize(
    "terms, message",
    [
        ([], "'terms' must be a non-empty list"),
        ([{"weight": 1.0}], "terms[0] must be a mapping with a 'name'"),
        ([{"name": "csd", "scale": 2}], "terms[0] has unknown key 'scale'"),
        ([{"name": "ce", "weight": -1}], "terms[0].weight must be a number >= 0"),
        ([{"name": "csd"}, {"name": "tvdd"}], "terms[1]: unknown loss 'tvdd'; did you mean 'tvd'?"),
        ([{"name": "csd", "params": {"temperature": 0}}], "terms[0]: csd: 'temperature' must be > 0"),
    ],
)
def test_mix_configuration_errors_name_the_term(terms, message):
    with pytest.raises(LossConfigError) as err:
        get_loss("mix", terms=terms)
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["ce", "mix"])
def test_autograd_reference_path_equals_the_closed_form(name):
    """``token_loss`` (plain autograd) and ``token_loss_and_grad`` agree row by row, with padded
    vocabulary entries (valid False) left out."""
    z, t, targets, _ = _case(v=11)
    valid = torch.ones_like(z, dtype=torch.bool)
    valid[:, -2:] = False
    targets = targets % 9
    onehot = torch.nn.functional.one_hot(targets, z.shape[1]).bool()
    params = {"terms": [{"name": "ce", "weight": 0.75}, {"name": "fkl", "weight": 0.5}]} if name == "mix" else {}
    loss = get_loss(name, **params)
    per_row, grad = loss.token_loss_and_grad(z, t, valid, onehot)
    zz = z.clone().requires_grad_(True)
    auto = loss.token_loss(zz, t, valid, onehot)
    (auto_grad,) = torch.autograd.grad(auto.sum(), zz)
    assert torch.allclose(auto, per_row, atol=1e-12) and torch.allclose(auto_grad, grad, atol=1e-12)
    nll = -torch.log_softmax(z[:, :9], -1).gather(1, targets[:, None])[:, 0]
    if name == "ce":
        assert torch.allclose(per_row, nll, atol=1e-12)
    else:
        p, log_q = torch.softmax(t[:, :9], -1), torch.log_softmax(z[:, :9], -1)
        fkl = (p * (p.log() - log_q)).sum(-1)
        assert torch.allclose(per_row, 0.75 * nll + 0.5 * fkl, atol=1e-12)
