"""Teacher-signal payloads: what travels from the teacher to the trainer (DESIGN §2).

Every payload answers one question for the chunk loop: for these token rows, which
vocabulary ids take part (``None`` = the whole vocabulary) and what are the teacher's
logits there. Teacher log-probs are as good as logits for every loss here because all of
them are invariant to a per-position shift of the teacher's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from csd_ray.losses.errors import LossInputError


@dataclass
class DenseTeacher:
    """Full teacher logits ``[N, V]``: exact, V numbers per token."""

    logits: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.logits.shape[0]

    def chunk(self, rows: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        return None, self.logits[rows]

    def bytes_per_token(self) -> int:
        return self.logits.shape[1] * self.logits.element_size()


@dataclass
class TopKTeacher:
    """Teacher log-probs on an index set per token: ``ids [N, K]``, ``logprobs [N, K]``.

    A slot whose log-prob is ``-inf`` is padding and takes no part. The losses are then the
    objective restricted to the index set: CSD matches relative logit differences inside the
    set (well defined), KL-type losses compare the two distributions renormalised over it.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape or self.ids.dim() != 2:
            raise LossInputError(
                f"TopKTeacher: ids and logprobs must both be [N, K]; got ids {tuple(self.ids.shape)} "
                f"and logprobs {tuple(self.logprobs.shape)}"
            )

    @property
    def num_rows(self) -> int:
        return self.ids.shape[0]

    def chunk(self, rows: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        return self.ids[rows], self.logprobs[rows]

    def bytes_per_token(self) -> int:
        return self.ids.shape[1] * (self.ids.element_size() + self.logprobs.element_size())


@dataclass
class HiddenTeacher:
    """Teacher final hidden states ``[N, d]`` plus its lm_head ``[V, d]``: exact, d numbers per token.

    The trainer holds ``lm_head`` once; teacher logits are rebuilt chunk by chunk, so the full
    ``[N, V]`` teacher logits never exist.
    """

    hidden: torch.Tensor
    lm_head: torch.Tensor
    bias: Optional[torch.Tensor] = None
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    """The teacher's logit transform (csd_ray.logits.LogitTransform), applied after the lm_head."""

    def __post_init__(self) -> None:
        if self.hidden.dim() != 2 or self.lm_head.dim() != 2 or self.hidden.shape[1] != self.lm_head.shape[1]:
            raise LossInputError(
                f"HiddenTeacher: hidden must be [N, d] and lm_head [V, d] with the same d; got hidden "
                f"{tuple(self.hidden.shape)} and lm_head {tuple(self.lm_head.shape)}"
            )

    @property
    def num_rows(self) -> int:
        return self.hidden.shape[0]

    def chunk(self, rows: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        # The matmul runs in the lm_head's dtype (the trainer keeps it in fp32), whatever dtype
        # the teacher's hidden states travelled in (a bf16 teacher sends bf16).
        logits = self.hidden[rows].to(self.lm_head.dtype) @ self.lm_head.t()
        if self.bias is not None:
            logits = logits + self.bias
        return None, logits if self.transform is None else self.transform(logits)

    def bytes_per_token(self) -> int:
        return self.hidden.shape[1] * self.hidden.element_size()


TeacherSignal = Union[DenseTeacher, TopKTeacher, HiddenTeacher]


def as_teacher_signal(teacher: Union[torch.Tensor, TeacherSignal]) -> TeacherSignal:
    """A bare tensor means dense teacher logits."""
    if isinstance(teacher, torch.Tensor):
        if teacher.dim() != 2:
            raise LossInputError(f"teacher logits must be [N, V]; got shape {tuple(teacher.shape)}")
        return DenseTeacher(teacher)
    if isinstance(teacher, (DenseTeacher, TopKTeacher, HiddenTeacher)):
        return teacher
    raise LossInputError(
        f"teacher must be a logits tensor, DenseTeacher, TopKTeacher or HiddenTeacher; got {type(teacher).__name__}"
    )


def topk_from_logits(
    teacher_logits: torch.Tensor, k: int, extra_ids: Optional[torch.Tensor] = None
) -> TopKTeacher:
    """Build a top-k payload from full teacher logits, optionally merged with extra ids.

    ``extra_ids [N, K2]`` (e.g. the student's own top-k, or the sampled token) are added to the
    index set; ids already in the teacher's top-k are not counted twice (their slot becomes
    padding). Negative extra ids are padding.
    """
    dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    logprobs = torch.log_softmax(teacher_logits.to(dtype), dim=-1)
    top_lp, top_ids = logprobs.topk(k, dim=-1)
    if extra_ids is None:
        return TopKTeacher(top_ids, top_lp)
    extra = extra_ids.clamp_min(0)
    extra_lp = logprobs.gather(-1, extra)
    duplicate = (extra[:, :, None] == top_ids[:, None, :]).any(-1)
    # Earlier extra slots win over later identical ones.
    same = extra[:, :, None] == extra[:, None, :]
    earlier = torch.ones(extra.shape[1], extra.shape[1], dtype=torch.bool, device=extra.device).tril(-1)
    duplicate |= (same & earlier).any(-1)
    duplicate |= extra_ids < 0
    extra_lp = extra_lp.masked_fill(duplicate, float("-inf"))
    return TopKTeacher(torch.cat([top_ids, extra], dim=1), torch.cat([top_lp, extra_lp], dim=1))
