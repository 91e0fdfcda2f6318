"""Distillation losses: CSD and baselines behind one interface (DESIGN §1–3).

``get_loss(name, **params)`` returns a loss object that is called as
``loss_fn(student_logits [N,V], teacher, mask [N]) -> (loss, metrics)`` and, without forming
the batch's logits, as ``loss_fn.fused(student_hidden, student_lm_head, teacher, mask)``.
``teacher`` is dense logits or a payload from ``csd_ray.losses.signals``.
"""

from csd_ray.losses import baselines, composite, csd  # noqa: F401  (registers the losses)
from csd_ray.losses.base import DistillationLoss
from csd_ray.losses.errors import LossConfigError, LossInputError
from csd_ray.losses.registry import available_losses, get_loss, loss_class
from csd_ray.losses.signals import DenseTeacher, HiddenTeacher, TeacherSignal, TopKTeacher, topk_from_logits

__all__ = [
    "DenseTeacher",
    "DistillationLoss",
    "HiddenTeacher",
    "LossConfigError",
    "LossInputError",
    "TeacherSignal",
    "TopKTeacher",
    "available_losses",
    "get_loss",
    "loss_class",
    "topk_from_logits",
]
