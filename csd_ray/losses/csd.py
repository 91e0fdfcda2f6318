"""Concrete Score Distillation (Kim et al., ICLR 2026), DESIGN §1.

With residual ``δ = z − t`` and stop-gradient weight distributions ``a, b`` over the valid
vocabulary, the pairwise objective

    L = ¼ Σ_i Σ_j a_i b_j ((z_i − z_j) − (t_i − t_j))²
      = ¼ (Var_a δ + Var_b δ + (E_a δ − E_b δ)²)

costs O(V), and its gradient has the closed form

    ∂L/∂z_k = ½ [b_k (δ_k − E_a δ) + a_k (δ_k − E_b δ)],

so no autograd graph is built. Only differences of logits enter, which makes the loss
invariant to per-position shifts of either side (teacher log-probs work as teacher logits).
"""

from __future__ import annotations

import torch

from csd_ray.losses.base import DistillationLoss, row_dot
from csd_ray.losses.errors import LossConfigError
from csd_ray.losses.registry import register_loss

WEIGHTINGS = ("student", "teacher", "uniform", "mix")


def masked_softmax(x: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(x / τ) over the valid entries; exactly 0 elsewhere."""
    probs = torch.softmax((x / temperature).masked_fill(~valid, float("-inf")), dim=-1)
    return probs.masked_fill(~valid, 0.0)


@register_loss("csd")
class CSDLoss(DistillationLoss):
    """CSD with weightings ``weights=(a, b)`` from ``student`` (q_τ), ``teacher`` (p_τ),
    ``uniform`` and ``mix`` (α p_τ + (1−α) q_τ). (S,S) is the mode-seeking default; (U,S) balanced,
    (T,S) mode-covering, (mix,S) with α=0.15 the paper's TS-mix."""

    params = {"weights": ("student", "student"), "alpha": 0.5, "temperature": 1.0}

    def validate(self) -> None:
        if isinstance(self.weights, str) or len(self.weights) != 2:
            raise LossConfigError(f"csd: 'weights' must be a pair (a, b), got {self.weights!r}")
        self.weights = tuple(self.weights)
        for w in self.weights:
            if w not in WEIGHTINGS:
                raise LossConfigError(f"csd: unknown weighting '{w}' in 'weights'; expected one of {', '.join(WEIGHTINGS)}")
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise LossConfigError(f"csd: 'alpha' must be in [0, 1], got {self.alpha!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise LossConfigError(f"csd: 'temperature' must be > 0, got {self.temperature!r}")

    def _weight(self, kind: str, z: torch.Tensor, t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if kind == "student":
            return masked_softmax(z, valid, self.temperature)
        if kind == "teacher":
            return masked_softmax(t, valid, self.temperature)
        if kind == "uniform":
            v = valid.to(z.dtype)
            return v / v.sum(-1, keepdim=True).clamp_min(1.0)
        return self.alpha * masked_softmax(t, valid, self.temperature) + (1.0 - self.alpha) * masked_softmax(
            z, valid, self.temperature
        )

    def _pair(self, z, t, valid) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight distributions (a, b): always stop-gradient."""
        z = z.detach()
        a = self._weight(self.weights[0], z, t, valid)
        b = a if self.weights[1] == self.weights[0] else self._weight(self.weights[1], z, t, valid)
        return a, b

    def token_loss(self, z, t, valid):
        # Differentiable form: autograd of this equals the closed form in token_loss_and_grad.
        return _csd(z, t, valid, *self._pair(z, t, valid), with_grad=False)[0]

    def token_loss_and_grad(self, z, t, valid):
        return _csd(z, t, valid, *self._pair(z, t, valid), with_grad=True)

    def _fast_weight(self, kind: str, z, t, cache: dict):
        """A weight distribution over an all-valid chunk: a ``[c, V]`` tensor, or the float 1/V
        for ``uniform`` (never materialised)."""
        if kind == "uniform":
            return 1.0 / z.shape[1]
        if kind == "mix":
            p, q = self._fast_weight("teacher", z, t, cache), self._fast_weight("student", z, t, cache)
            return torch.lerp(q, p, self.alpha)  # α p + (1 − α) q
        if kind not in cache:
            x = z if kind == "student" else t
            cache[kind] = torch.softmax(x if self.temperature == 1.0 else x / self.temperature, dim=-1)
        return cache[kind]

    def fast_loss_and_grad(self, z, t, target=None):
        """The closed form in ~6 passes over the chunk (S,S) to ~10 (TS-mix).

        Centre the residual on a: δ' = δ − E_a δ, so E_a δ' = 0 and, with e = E_b δ',
        L = ¼ (Var_a + Var_b + (E_a − E_b)²) = ¼ Σ_k (a_k + b_k) δ'_k²  (the e² terms cancel) and
        ∂L/∂z = ½ [(a + b) δ' − a e]; every term of L is ≥ 0, so no cancellation in fp32."""
        cache: dict = {}
        a = self._fast_weight(self.weights[0], z, t, cache)
        b = a if self.weights[1] == self.weights[0] else self._fast_weight(self.weights[1], z, t, cache)
        delta = torch.sub(z, t, out=t)  # t (own buffer) is not needed past the weights
        delta.sub_(_mean(a, delta))
        if a is b:
            # (S,S), (T,T), (U,U): e = 0 and ½ (a + b) = a.
            grad = delta.mul(a) if isinstance(a, float) else a.mul_(delta)
            return 0.5 * row_dot(grad, delta).squeeze(1), grad
        e = _mean(b, delta)
        if isinstance(a, float) or isinstance(b, float):
            tensor, scalar = (b, a) if isinstance(a, float) else (a, b)
            grad = tensor.add(scalar).mul_(0.5)
        else:
            grad = torch.lerp(a, b, 0.5)
        grad.mul_(delta)  # ½ (a + b) δ'
        value = 0.5 * row_dot(grad, delta).squeeze(1)
        if isinstance(a, float):
            grad.sub_(e, alpha=0.5 * a)
        else:
            grad.addcmul_(a, e, value=-0.5)
        return value, grad


def _mean(weight, x):
    """E_weight x per row, ``[c, 1]``; a float weight is the uniform 1/V."""
    return x.mean(-1, keepdim=True) if isinstance(weight, float) else row_dot(weight, x)


def _csd(z, t, valid, a, b, with_grad: bool):
    delta = torch.where(valid, z - t, torch.zeros((), dtype=z.dtype))
    mean_a = (a * delta).sum(-1, keepdim=True)
    mean_b = (b * delta).sum(-1, keepdim=True)
    centred_a = delta - mean_a
    centred_b = delta - mean_b
    value = 0.25 * ((a * centred_a**2).sum(-1) + (b * centred_b**2).sum(-1) + (mean_a - mean_b).squeeze(-1) ** 2)
    grad = 0.5 * (b * centred_a + a * centred_b) if with_grad else None
    return value, grad
