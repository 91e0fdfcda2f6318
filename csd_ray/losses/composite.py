"""Losses on the response tokens themselves, and mixtures of losses.

* ``ce``: cross-entropy of the response tokens under the student, −log softmax(z)[target]
  (supervised KD on dataset responses, SeqKD on teacher samples, an auxiliary LM term).
  It ignores the teacher signal and needs the full vocabulary (dense or hidden payload).
* ``mix``: Σ_k w_k L_k over named terms, e.g. a distillation loss plus ``w·ce`` (the auxiliary
  language-modelling loss of MiniLLM/DistiLLM-style recipes). Each term is a registered loss with
  its own parameters; the mixture is shift invariant only when every term is.

    loss: {name: mix, params: {terms: [{name: csd, params: {weights: [teacher, student]}},
                                       {name: ce, weight: 0.1}]}}
"""

from __future__ import annotations

from typing import Any

import torch

from csd_ray.losses.base import DistillationLoss
from csd_ray.losses.baselines import masked_log_softmax
from csd_ray.losses.errors import LossConfigError
from csd_ray.losses.registry import loss_class, register_loss


@register_loss("ce")
class CrossEntropy(DistillationLoss):
    """Per token −log q(target) with q = softmax(z) over the valid vocabulary; gradient q − onehot."""

    uses_targets = True

    def token_loss(self, z, t, valid, target):
        log_q = masked_log_softmax(z, valid, 1.0)
        return -torch.where(target, log_q, torch.zeros((), dtype=log_q.dtype)).sum(-1)

    def token_loss_and_grad(self, z, t, valid, target):
        log_q = masked_log_softmax(z, valid, 1.0)
        value = -torch.where(target, log_q, torch.zeros((), dtype=log_q.dtype)).sum(-1)
        grad = log_q.exp().masked_fill(~valid, 0.0) - target.to(z.dtype)
        return value, grad

    def fast_loss_and_grad(self, z, t, target=None):
        # −log q(y) = lse(z) − z_y;  gradient softmax(z) − onehot(y).
        rows = torch.arange(z.shape[0], device=z.device)
        value = torch.logsumexp(z, -1) - z[rows, target]
        grad = torch.softmax(z, -1)
        grad[rows, target] -= 1.0
        return value, grad


@register_loss("mix")
class MixedLoss(DistillationLoss):
    """Σ_k weight_k · loss_k on the same tokens; ``terms`` is a list of {name, weight, params}."""

    params = {"terms": ()}

    def validate(self) -> None:
        if isinstance(self.terms, (str, dict)) or not self.terms:
            raise LossConfigError(f"mix: 'terms' must be a non-empty list of {{name, weight, params}}, got {self.terms!r}")
        built: list[tuple[float, DistillationLoss]] = []
        for i, term in enumerate(self.terms):
            if not isinstance(term, dict) or "name" not in term:
                raise LossConfigError(f"mix: terms[{i}] must be a mapping with a 'name', got {term!r}")
            unknown = sorted(set(term) - {"name", "weight", "params"})
            if unknown:
                raise LossConfigError(f"mix: terms[{i}] has unknown key '{unknown[0]}'; accepted: name, weight, params")
            weight = term.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise LossConfigError(f"mix: terms[{i}].weight must be a number >= 0, got {weight!r}")
            if term["name"] == "mix":
                raise LossConfigError(f"mix: terms[{i}] is itself a mix; list its terms instead")
            try:
                loss = loss_class(term["name"])(vocab_size=self.vocab_size, **dict(term.get("params") or {}))
            except LossConfigError as exc:
                raise LossConfigError(f"mix: terms[{i}]: {exc}") from None
            built.append((float(weight), loss))
        self.parts = built
        # Instance attributes shadow the class flags the base reads.
        self.shift_invariant = all(loss.shift_invariant for _, loss in built)
        self.uses_targets = any(loss.uses_targets for _, loss in built)

    def describe(self) -> str:
        return "mix(" + " + ".join(f"{w:g}*{loss.describe()}" for w, loss in self.parts) + ")"

    def _call(self, loss: DistillationLoss, method: str, z, t, valid, target: Any):
        extra = (target,) if loss.uses_targets else ()
        return getattr(loss, method)(z, t, valid, *extra)

    def token_loss(self, z, t, valid, *target):
        target = target[0] if target else None
        return sum(w * self._call(loss, "token_loss", z, t, valid, target) for w, loss in self.parts)

    def fast_loss_and_grad(self, z, t, target=None):
        # Terms work in place on z and t: each gets its own copies, except the last.
        value = grad = None
        for i, (w, loss) in enumerate(self.parts):
            last = i == len(self.parts) - 1
            out = loss.fast_loss_and_grad(z if last else z.clone(), t if last else t.clone(),
                                          target if loss.uses_targets else None)
            if out is None:
                return None
            v, g = out
            value = w * v if value is None else value.add_(v, alpha=w)
            grad = g.mul_(w) if grad is None else grad.add_(g, alpha=w)
        return value, grad

    def token_loss_and_grad(self, z, t, valid, *target):
        target = target[0] if target else None
        value = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        grad = torch.zeros_like(z)
        for w, loss in self.parts:
            v, g = self._call(loss, "token_loss_and_grad", z, t, valid, target)
            value += w * v
            grad += w * g
        return value, grad
