"""What moves between actors: rollouts (sampler -> teacher, trainer) and teacher outputs.

Layout of a rollout: prompts left-padded to a common length P, responses from column P on,
right-padded after EOS. ``response_mask[b, j]`` marks response tokens; the model predicts
token j from position j-1, so the loss rows are ``hidden[:, :-1][response_mask[:, 1:]]``
in row-major order, and every teacher payload uses the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from csd_ray.losses.signals import DenseTeacher, HiddenTeacher, TeacherSignal, TopKTeacher


@dataclass
class Rollout:
    input_ids: torch.Tensor
    """[B, T] prompt (left-padded) + response (right-padded)."""
    attention_mask: torch.Tensor
    """[B, T] 1 for real tokens."""
    response_mask: torch.Tensor
    """[B, T] bool, True on response tokens (up to and including EOS)."""
    sampled_logprobs: Optional[torch.Tensor] = None
    """[B, T] sampler log-prob of each response token (0 elsewhere); None for non-sampled sources."""
    student_topk_ids: Optional[torch.Tensor] = None
    """[B, T, k] student's top-k ids at each position whose next token is a response token."""
    weight_version: int = 0
    """Version of the student weights that sampled it (teacher/dataset sources: trainer version)."""
    source: str = "student"
    """student | teacher | dataset."""
    loss_weight: float = 1.0
    """Per-source weight of these tokens in the loss."""
    prompt_indices: list[int] = field(default_factory=list)
    """Dataset indices of the prompts (one per sequence)."""
    rollout_id: int = -1
    """Unique id given by the controller (replay, accounting)."""
    seconds: float = 0.0
    """Time the sampler spent producing it."""
    worker_pid: int = 0
    """Process that produced it (the controller notices restarted actors by new pids)."""

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    def target_mask(self) -> torch.Tensor:
        """[B, T-1]: positions whose next token is a response token (the loss rows)."""
        return self.response_mask[:, 1:]

    def num_tokens(self) -> int:
        return int(self.response_mask.sum())

    def select(self, start: int, stop: int) -> "Rollout":
        def cut(x):
            return None if x is None else x[start:stop]

        return Rollout(
            cut(self.input_ids), cut(self.attention_mask), cut(self.response_mask), cut(self.sampled_logprobs),
            cut(self.student_topk_ids), self.weight_version, self.source, self.loss_weight,
            self.prompt_indices[start:stop], self.rollout_id, self.seconds, self.worker_pid,
        )


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """Join rollouts (e.g. shards of several samplers): re-pad to one common layout."""
    if len(parts) == 1:
        return parts[0]
    widths = {id(p): _prompt_width(p) for p in parts}
    prompt_len = max(widths.values())
    resp_len = max(p.input_ids.shape[1] - widths[id(p)] for p in parts)

    def pad(p: Rollout, x: Optional[torch.Tensor], value) -> Optional[torch.Tensor]:
        if x is None:
            return None
        width = widths[id(p)]
        left, right = prompt_len - width, resp_len - (x.shape[1] - width)
        pads = [0, 0] * (x.dim() - 2) + [left, right]
        return torch.nn.functional.pad(x, pads, value=value)

    first = parts[0]
    return Rollout(
        torch.cat([pad(p, p.input_ids, 0) for p in parts]),
        torch.cat([pad(p, p.attention_mask, 0) for p in parts]),
        torch.cat([pad(p, p.response_mask, False) for p in parts]),
        None if first.sampled_logprobs is None else torch.cat([pad(p, p.sampled_logprobs, 0.0) for p in parts]),
        None if first.student_topk_ids is None else torch.cat([pad(p, p.student_topk_ids, -1) for p in parts]),
        min(p.weight_version for p in parts), first.source, first.loss_weight,
        sum((p.prompt_indices for p in parts), []), first.rollout_id, max(p.seconds for p in parts), first.worker_pid,
    )


def _prompt_width(r: Rollout) -> int:
    """Column where responses start (first column holding any response token)."""
    cols = r.response_mask.any(0).nonzero()
    return int(cols[0]) if cols.numel() else r.input_ids.shape[1]


def rollout_from_tokens(prompts: list[list[int]], responses: list[list[int]], pad_id: int, **meta) -> Rollout:
    """Build a rollout from token lists (dataset responses, teacher samples)."""
    p_len = max(len(p) for p in prompts)
    r_len = max(max(len(r) for r in responses), 1)
    b = len(prompts)
    ids = torch.full((b, p_len + r_len), pad_id, dtype=torch.long)
    attn = torch.zeros(b, p_len + r_len, dtype=torch.long)
    resp = torch.zeros(b, p_len + r_len, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, p_len - len(p) : p_len] = torch.tensor(p, dtype=torch.long)
        attn[i, p_len - len(p) : p_len] = 1
        if r:
            ids[i, p_len : p_len + len(r)] = torch.tensor(r, dtype=torch.long)
            attn[i, p_len : p_len + len(r)] = 1
            resp[i, p_len : p_len + len(r)] = True
    return Rollout(ids, attn, resp, **meta)


@dataclass
class TeacherOutput:
    """The teacher's signal for one rollout: one row per loss row, plus per-sequence offsets."""

    payload: str
    """logits | topk | hidden."""
    rows: dict[str, torch.Tensor]
    """logits: {'logits'}; topk: {'ids', 'logprobs'}; hidden: {'hidden'} (lm_head held by the trainer)."""
    offsets: torch.Tensor
    """[B+1] row offsets of each sequence."""
    seconds: float = 0.0
    """Time the teacher spent scoring."""
    worker_pid: int = 0
    """Process that scored it."""

    def select(self, start: int, stop: int) -> "TeacherOutput":
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        rows = {k: v[lo:hi] for k, v in self.rows.items()}
        return TeacherOutput(self.payload, rows, self.offsets[start : stop + 1] - lo, self.seconds, self.worker_pid)

    def to(self, device: torch.device) -> "TeacherOutput":
        return TeacherOutput(self.payload, {k: v.to(device) for k, v in self.rows.items()}, self.offsets, self.seconds,
                             self.worker_pid)

    def signal(self, teacher_lm_head: Optional[torch.Tensor] = None, teacher_transform=None) -> TeacherSignal:
        """The payload as a loss input; 'hidden' needs the teacher's lm_head ``[V, d]`` and logit transform."""
        if self.payload == "logits":
            return DenseTeacher(self.rows["logits"])
        if self.payload == "topk":
            return TopKTeacher(self.rows["ids"], self.rows["logprobs"])
        assert teacher_lm_head is not None, "the hidden payload needs the teacher's lm_head on the trainer"
        transform = None if teacher_transform is None or teacher_transform.identity else teacher_transform
        return HiddenTeacher(self.rows["hidden"], teacher_lm_head, transform=transform)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.rows.values())


def topk_extra_ids(rollout: Rollout) -> torch.Tensor:
    """``[N, 1 (+k)]`` ids every top-k payload adds to the teacher's top-k, one row per loss row.

    The token actually in the response comes first (vLLM's prompt log-probs always carry it, so
    both teacher backends build the same index set), then the student's top-k when the sampler
    recorded it. The loss is then the objective restricted to teacher top-k ∪ these ids."""
    target = rollout.target_mask()
    ids = rollout.input_ids[:, 1:][target][:, None]
    if rollout.student_topk_ids is not None:
        ids = torch.cat([ids, rollout.student_topk_ids[:, 1:][target]], dim=1)
    return ids


def row_offsets(target_mask: torch.Tensor) -> torch.Tensor:
    counts = target_mask.sum(1)
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
