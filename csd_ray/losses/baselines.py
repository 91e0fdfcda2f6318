"""Baseline distillation losses behind the same interface as CSD.

Each is a per-token divergence between p = softmax(t/τ) (teacher) and q = softmax(z/τ)
(student) over the valid vocabulary; DLD compares raw logits. With a top-k payload the
distributions are renormalised over the index set.
"""

from __future__ import annotations

import math

import torch

from csd_ray.losses.base import DistillationLoss, row_dot, softmax_backward_
from csd_ray.losses.errors import LossConfigError
from csd_ray.losses.registry import register_loss


# Invalid entries get a huge finite logit, not -inf: exp() still gives exactly 0, but terms such as
# logaddexp(-inf, -inf) would have NaN derivatives that leak through torch.where into the gradient.
_EXCLUDED_LOGIT = -1e30


def masked_log_softmax(x: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax((x / temperature).masked_fill(~valid, _EXCLUDED_LOGIT), dim=-1)


def kl(log_p: torch.Tensor, log_q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, summing only valid entries (where 0·log 0 would be NaN)."""
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(valid, terms, torch.zeros((), dtype=terms.dtype)).sum(-1)


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w p + (1 − w) q), stable."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def _log_softmax(x: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.log_softmax(x if temperature == 1.0 else x / temperature, dim=-1)


#: Smallest positive (subnormal) value per dtype: the floor of a mixture of probabilities.
_SMALLEST = {dt: torch.finfo(dt).tiny * torch.finfo(dt).eps for dt in (torch.float32, torch.float64)}


def _log_of_mixture(p: torch.Tensor, q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w p + (1 − w) q) from probabilities (fast paths): one lerp and one log instead of a
    logaddexp; where both underflow to 0 the mixture is clamped to the smallest subnormal, so
    log m stays finite and the 0 · log terms stay 0."""
    return torch.lerp(q, p, weight_p).clamp_min_(_SMALLEST[p.dtype]).log_()


class _DivergenceLoss(DistillationLoss):
    """Fast paths (all-valid chunks): each loss gives dL/dq for q = softmax(z/τ) in closed form
    and ``softmax_backward_`` maps it to dL/dz in two passes, instead of autograd's graph."""

    params = {"temperature": 1.0}

    def validate(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise LossConfigError(f"{self.name}: 'temperature' must be > 0, got {self.temperature!r}")

    def _log_probs(self, z, t, valid):
        return masked_log_softmax(t, valid, self.temperature), masked_log_softmax(z, valid, self.temperature)


@register_loss("fkl")
class ForwardKL(_DivergenceLoss):
    """KL(p || q): mode covering; gradient w.r.t. logits is q − p at τ = 1."""

    def token_loss(self, z, t, valid):
        log_p, log_q = self._log_probs(z, t, valid)
        return kl(log_p, log_q, valid)

    def fast_loss_and_grad(self, z, t, target=None):
        log_p, log_q = _log_softmax(t, self.temperature), _log_softmax(z, self.temperature)
        ratio = torch.sub(log_p, log_q, out=t)
        p, q = log_p.exp_(), log_q.exp_()
        value = row_dot(p, ratio).squeeze(1)
        grad = q.sub_(p)  # (q − p) / τ
        return value, grad if self.temperature == 1.0 else grad.div_(self.temperature)


@register_loss("rkl")
class ReverseKL(_DivergenceLoss):
    """KL(q || p): mode seeking."""

    def token_loss(self, z, t, valid):
        log_p, log_q = self._log_probs(z, t, valid)
        return kl(log_q, log_p, valid)

    def fast_loss_and_grad(self, z, t, target=None):
        log_p, log_q = _log_softmax(t, self.temperature), _log_softmax(z, self.temperature)
        ratio = log_q.sub(log_p)  # log q − log p = dKL/dq − 1 (the constant drops in the softmax)
        q = log_q.exp_()
        value = row_dot(q, ratio)
        grad = ratio.sub_(value).mul_(q)  # q ⊙ (r − KL) / τ
        return value.squeeze(1), grad if self.temperature == 1.0 else grad.div_(self.temperature)


@register_loss("gjsd")
class GeneralizedJSD(_DivergenceLoss):
    """GKD's JSD(β) = β KL(p || m) + (1−β) KL(q || m), m = β p + (1−β) q; β=0 is FKL, β=1 is RKL."""

    params = {"temperature": 1.0, "beta": 0.5}

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta <= 1.0:
            raise LossConfigError(f"gjsd: 'beta' must be in [0, 1], got {self.beta!r}")

    def token_loss(self, z, t, valid):
        log_p, log_q = self._log_probs(z, t, valid)
        if self.beta == 0.0:
            return kl(log_p, log_q, valid)
        if self.beta == 1.0:
            return kl(log_q, log_p, valid)
        log_m = log_mixture(log_p, log_q, self.beta)
        return self.beta * kl(log_p, log_m, valid) + (1.0 - self.beta) * kl(log_q, log_m, valid)

    def fast_loss_and_grad(self, z, t, target=None):
        if self.beta in (0.0, 1.0):
            return (ForwardKL if self.beta == 0.0 else ReverseKL).fast_loss_and_grad(self, z, t)
        log_p, log_q = _log_softmax(t, self.temperature), _log_softmax(z, self.temperature)
        p, q = log_p.exp(), log_q.exp()
        log_m = _log_of_mixture(p, q, self.beta)
        # L = β <p, log p − log m> + (1−β) <q, log q − log m>;  dL/dq = (1−β)(log q − log m).
        value = self.beta * row_dot(p, log_p.sub_(log_m)).squeeze(1)
        g = log_q.sub_(log_m)
        value += (1.0 - self.beta) * row_dot(q, g).squeeze(1)
        return value, softmax_backward_(q, g.mul_(1.0 - self.beta), self.temperature)


class _SkewedLoss(_DivergenceLoss):
    params = {"temperature": 1.0, "skew": 0.1}

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.skew, (int, float)) or not 0.0 < self.skew < 1.0:
            raise LossConfigError(f"{self.name}: 'skew' must be in (0, 1), got {self.skew!r}")


@register_loss("sfkl")
class SkewForwardKL(_SkewedLoss):
    """DistiLLM's skew KL: KL(p || λ p + (1−λ) q)."""

    def token_loss(self, z, t, valid):
        log_p, log_q = self._log_probs(z, t, valid)
        return kl(log_p, log_mixture(log_p, log_q, self.skew), valid)

    def fast_loss_and_grad(self, z, t, target=None):
        log_p, q = _log_softmax(t, self.temperature), torch.softmax(z if self.temperature == 1.0 else z / self.temperature, -1)
        p = log_p.exp()
        m = torch.lerp(q, p, self.skew).clamp_min_(_SMALLEST[q.dtype])  # λ p + (1−λ) q, > 0
        value = row_dot(p, log_p.sub_(m.log())).squeeze(1)
        # dL/dq = −(1−λ) p / m  (m ≥ λ p, so p / m stays finite)
        g = m.reciprocal_().mul_(p).mul_(self.skew - 1.0)
        return value, softmax_backward_(q, g, self.temperature)


@register_loss("srkl")
class SkewReverseKL(_SkewedLoss):
    """DistiLLM's skew reverse KL: KL(q || λ q + (1−λ) p)."""

    def token_loss(self, z, t, valid):
        log_p, log_q = self._log_probs(z, t, valid)
        return kl(log_q, log_mixture(log_q, log_p, self.skew), valid)

    def fast_loss_and_grad(self, z, t, target=None):
        log_q, p = _log_softmax(z, self.temperature), torch.softmax(t if self.temperature == 1.0 else t / self.temperature, -1)
        q = log_q.exp()
        m = torch.lerp(p, q, self.skew).clamp_min_(_SMALLEST[q.dtype])  # λ q + (1−λ) p, > 0
        g = log_q.sub_(m.log())  # log q − log m
        value = row_dot(q, g).squeeze(1)
        # dL/dq = log q − log m + 1 − λ q / m  (the constant 1 drops in the softmax backward)
        g.addcdiv_(q, m, value=-self.skew)
        return value, softmax_backward_(q, g, self.temperature)


@register_loss("tvd")
class TotalVariation(_DivergenceLoss):
    """½ Σ |p − q|."""

    def token_loss(self, z, t, valid):
        log_p, log_q = self._log_probs(z, t, valid)
        diff = (log_p.exp() - log_q.exp()).abs()
        return 0.5 * torch.where(valid, diff, torch.zeros((), dtype=diff.dtype)).sum(-1)

    def fast_loss_and_grad(self, z, t, target=None):
        tau = self.temperature
        q = torch.softmax(z if tau == 1.0 else z / tau, -1)
        diff = torch.sub(q, torch.softmax(t if tau == 1.0 else t / tau, -1), out=t)  # q − p
        value = 0.5 * diff.abs().sum(-1)
        # dL/dq = ½ sign(q − p) (autograd's convention: 0 where q = p)
        return value, softmax_backward_(q, diff.sign_().mul_(0.5), tau)


@register_loss("dld")
class DirectLogitDistillation(DistillationLoss):
    """Logit MSE, mean over the valid vocabulary: not shift invariant (the contrast to CSD)."""

    shift_invariant = False

    def token_loss(self, z, t, valid):
        # Zero the residual before squaring: (−inf − t)² has a NaN derivative that torch.where
        # would still pass into the gradient.
        diff = torch.where(valid, z - t, torch.zeros((), dtype=z.dtype))
        sq = diff**2
        return sq.sum(-1) / valid.sum(-1).clamp_min(1)

    def fast_loss_and_grad(self, z, t, target=None):
        diff = torch.sub(z, t, out=t)
        value = row_dot(diff, diff).squeeze(1) / z.shape[1]
        return value, diff.mul_(2.0 / z.shape[1])
