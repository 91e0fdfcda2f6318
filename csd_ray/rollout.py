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


def packed_layout(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rollout's real tokens as one packed row, for a padding-free forward.

    Returns ``input_ids`` [1, L] and ``position_ids`` [1, L] (L = real tokens of all sequences,
    concatenated in sequence order; positions restart at 0 with each sequence, as
    ``csd_ray.models.position_ids`` numbers them in the padded layout), and ``rows`` [N]: the
    packed index of every loss row, in the padded layout's row order (``target_mask()``), so
    ``hidden[0, rows]`` equals ``hidden_padded[:, :-1][target_mask()]``.

    With no 2D attention mask, transformers reads the restarting positions as packed sequences
    and keeps attention within each one (``masking_utils.find_packed_sequence_indices``).
    Raises ValueError when a response token follows padding (an empty prompt): its loss row
    would be read at a padding position, which has no packed counterpart."""
    real = rollout.attention_mask.bool()
    lengths = real.sum(1)
    flat = real.flatten().long().cumsum(0).view_as(real) - 1  # packed index of each real token
    starts = torch.cumsum(lengths, 0) - lengths
    total = int(lengths.sum())
    positions = torch.arange(total, device=real.device) - starts.repeat_interleave(lengths)
    target = rollout.target_mask()
    if not real[:, :-1][target].all():
        raise ValueError("a response token follows padding (empty prompt?): it has no position to be predicted from")
    return rollout.input_ids[real][None], positions[None], flat[:, :-1][target]


def micro_batches(rollout: Rollout, max_sequences: int = 0, max_tokens: int = 0, packed: bool = True,
                  at_least: int = 0) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` sequence ranges, each one micro-batch of a trainer rank.

    A range holds at most ``max_sequences`` sequences and at most ``max_tokens`` tokens as the
    forward pass sees them: prompt + response tokens when ``packed``, else rows x the widest
    row (padding included, columns that are padding in every row trimmed). 0 = no limit. A
    sequence alone over the token budget gets a micro-batch of its own. Sequences keep their
    order (teacher rows are sliced by range). The widest ranges are halved until there are
    ``at_least`` of them (at most one per sequence): FSDP ranks must run the same number of
    forward/backward passes, or their collectives would not pair up."""
    n = rollout.num_sequences
    if not max_tokens:
        size = max_sequences or max(n, 1)
        return _at_least([(s, min(s + size, n)) for s in range(0, n, size)], at_least)
    real = rollout.attention_mask.bool()
    lengths = real.sum(1).tolist()
    cols = torch.arange(real.shape[1])
    first = torch.where(real, cols, real.shape[1]).min(1).values.tolist()
    last = torch.where(real, cols, -1).max(1).values.tolist()
    out, start, used, lo, hi = [], 0, 0, 0, -1
    for i in range(n):
        if i > start:
            if packed:
                cost = used + lengths[i]
            else:
                cost = (i - start + 1) * (max(hi, last[i]) - min(lo, first[i]) + 1)
            if cost > max_tokens or (max_sequences and i - start >= max_sequences):
                out.append((start, i))
                start = i
        if i == start:
            used, lo, hi = 0, first[i], last[i]
        used += lengths[i]
        lo, hi = min(lo, first[i]), max(hi, last[i])
    if n:
        out.append((start, n))
    return _at_least(out, at_least)


def _at_least(ranges: list[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    ranges = list(ranges)
    while len(ranges) < count:
        i = max(range(len(ranges)), key=lambda j: ranges[j][1] - ranges[j][0])
        start, stop = ranges[i]
        if stop - start < 2:
            break
        middle = (start + stop) // 2
        ranges[i:i + 1] = [(start, middle), (middle, stop)]
    return ranges


def trimmed(rollout: Rollout) -> Rollout:
    """The rollout without the columns that are padding in every row (loss rows unchanged).

    A micro-batch cut from a batch keeps the batch's width; the padded forward then pads only to
    its own longest sequence. The column just before the first response column stays (it
    predicts that response token)."""
    real = rollout.attention_mask.bool().any(0).nonzero()
    if not real.numel():
        return rollout
    lo, hi = int(real[0]), int(real[-1]) + 1
    response = rollout.response_mask.any(0).nonzero()
    if response.numel():
        lo = max(0, min(lo, int(response[0]) - 1))
    if lo == 0 and hi == rollout.input_ids.shape[1]:
        return rollout

    def cut(x):
        return None if x is None else x[:, lo:hi]

    return Rollout(cut(rollout.input_ids), cut(rollout.attention_mask), cut(rollout.response_mask),
                   cut(rollout.sampled_logprobs), cut(rollout.student_topk_ids), rollout.weight_version, rollout.source,
                   rollout.loss_weight, rollout.prompt_indices, rollout.rollout_id, rollout.seconds, rollout.worker_pid)


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
