"""Baseline distillation losses behind the same interface as CSD.

Each is a per-token divergence between p = softmax(t/τ) (teacher) and q = softmax(z/τ)
(student) over the valid vocabulary; DLD compares raw logits. With a top-k payload the
distributions are renormalised over the index set.
"""

from __future__ import annotations

import math

import torch

from csd_ray.losses.base import DistillationLoss
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


class _DivergenceLoss(DistillationLoss):
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


@register_loss("rkl")
class ReverseKL(_DivergenceLoss):
    """KL(q || p): mode seeking."""

    def token_loss(self, z, t, valid):
        log_p, log_q = self._log_probs(z, t, valid)
        return kl(log_q, log_p, valid)


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


@register_loss("srkl")
class SkewReverseKL(_SkewedLoss):
    """DistiLLM's skew reverse KL: KL(q || λ q + (1−λ) p)."""

    def token_loss(self, z, t, valid):
        log_p, log_q = self._log_probs(z, t, valid)
        return kl(log_q, log_mixture(log_q, log_p, self.skew), valid)


@register_loss("tvd")
class TotalVariation(_DivergenceLoss):
    """½ Σ |p − q|."""

    def token_loss(self, z, t, valid):
        log_p, log_q = self._log_probs(z, t, valid)
        diff = (log_p.exp() - log_q.exp()).abs()
        return 0.5 * torch.where(valid, diff, torch.zeros((), dtype=diff.dtype)).sum(-1)


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
