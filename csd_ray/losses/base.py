"""One base for every distillation loss: chunking, masking and gradients live here.

A loss supplies only its math: ``token_loss(z, t, valid) -> [c]`` on a chunk of rows (and,
where it has one, a closed-form ``token_loss_and_grad``). This module owns everything else:

* selecting response tokens (``mask``) and weighting them (a float mask is a per-token weight);
* cutting the vocabulary at the real tokenizer length (``vocab_size``) and excluding ``-inf``
  logits from sums and weights (``valid``);
* fp32 math whatever the input dtype (float64 stays float64 for reference checks);
* a fast path for the common chunk whose logits are all finite (``fast_loss_and_grad``: the
  loss's closed form in a few in-place passes, no ``valid`` mask), the general masked path for
  the rest;
* the chunk loop that never holds more than ``chunk_size`` rows of ``[tokens x vocab]``
  (by default as many rows as fit ``CHUNK_ELEMENTS`` vocabulary entries, so a chunk's buffers
  stay ~32 MB each whatever the vocabulary size).

Both public paths run the same loop. ``loss(student_logits, teacher, mask)`` takes ready logits;
``loss.fused(hidden, lm_head, teacher, mask)`` forms each chunk's logits from hidden states and
the lm_head weight and sends the gradient straight back to them (Liger-Kernel's fused-linear
pattern), so the batch's full logits never exist.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, ClassVar, Optional, Union

import torch

from csd_ray.losses.errors import LossConfigError, LossInputError
from csd_ray.losses.signals import TeacherSignal, TopKTeacher, as_teacher_signal

Teacher = Union[torch.Tensor, TeacherSignal]

#: Default chunk budget in [rows x vocab] elements (32 MB per fp32 buffer).
CHUNK_ELEMENTS = 1 << 23

_MALLOC_TUNED = False


def keep_chunk_buffers_in_the_heap() -> bool:
    """Once per process (Linux/glibc, CPU tensors): let freed ``[chunk, V]`` buffers be reused.

    A chunk allocates a few 32 MB temporaries and frees them; glibc's defaults then hand the
    heap top back to the OS (trim above 2x its mmap threshold) and every chunk page-faults its
    buffers in again: ~100k faults and ~15% of a fused loss call at SmolLM2 shapes (issue 13).
    Here buffers up to 32 MB (glibc's maximum mmap threshold) come from the heap and up to
    1 GiB of free heap is kept: RSS stays at its high-water mark instead of breathing. Skipped
    when ``CSD_RAY_MALLOC_TUNE=0`` or the user set glibc's own ``MALLOC_*_`` variables.
    Returns whether glibc accepted the settings."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return False
    _MALLOC_TUNED = True
    user = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
    if os.environ.get("CSD_RAY_MALLOC_TUNE", "1") == "0" or any(k in os.environ for k in user):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


class DistillationLoss:
    """Base of all losses. Subclasses declare ``name`` and ``params`` and implement ``token_loss``."""

    name: ClassVar[str]
    #: False for losses on raw logits (DLD): top-k payloads carry log-probs, so they are refused.
    shift_invariant: ClassVar[bool] = True
    #: parameter name -> default; ``get_loss`` rejects anything else.
    params: ClassVar[dict[str, Any]] = {}
    #: True for losses on the response tokens themselves (cross-entropy): they are called as
    #: ``token_loss(z, t, valid, target)`` with ``target [c, W]`` True at each row's next token,
    #: and need ``targets=`` on the public paths. Such losses need the whole vocabulary (no top-k).
    uses_targets: ClassVar[bool] = False

    def __init__(self, vocab_size: Optional[int] = None, chunk_size: Optional[int] = None, **params: Any) -> None:
        if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size <= 0):
            raise LossConfigError(f"{self.name}: 'vocab_size' must be a positive integer, got {vocab_size!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
            raise LossConfigError(f"{self.name}: 'chunk_size' must be a positive integer, got {chunk_size!r}")
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            accepted = ", ".join(sorted(self.params)) or "none besides vocab_size and chunk_size"
            raise LossConfigError(f"{self.name}: unknown parameter '{unknown[0]}'; accepted: {accepted}")
        self.vocab_size = vocab_size
        self.chunk_size = chunk_size
        for key, default in self.params.items():
            setattr(self, key, params.get(key, default))
        self.validate()

    # ---- what a loss supplies -------------------------------------------------------------
    def validate(self) -> None:
        """Check the loss's own parameters; raise LossConfigError naming the parameter."""

    def token_loss(self, z: torch.Tensor, t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Per-row loss ``[c]`` from student logits ``z``, teacher logits ``t`` and ``valid [c, V]``.

        Must be differentiable in ``z``; entries where ``valid`` is False must not contribute.
        """
        raise NotImplementedError

    def token_loss_and_grad(
        self, z: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, *target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row loss ``[c]`` and its gradient w.r.t. ``z`` ``[c, V]``. Default: autograd.

        ``target`` (only for ``uses_targets`` losses): ``[c, V]`` bool, True at each row's next token."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            per_row = self.token_loss(z, t, valid, *target)
            (grad,) = torch.autograd.grad(per_row.sum(), z)
        return per_row.detach(), grad

    def fast_loss_and_grad(
        self, z: torch.Tensor, t: torch.Tensor, target: Optional[torch.Tensor] = None
    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Per-row loss ``[c]`` and gradient ``[c, V]`` for a chunk whose entries are all valid.

        Called only when every entry of ``z`` and ``t`` is finite (and inside ``vocab_size``), so
        no ``valid`` mask exists; ``z`` and ``t`` are this chunk's own buffers (fp32 or float64)
        and may be overwritten. ``target [c]`` (``uses_targets`` losses only) holds each row's
        token id, already checked to lie in ``[0, V)``. Must equal ``token_loss_and_grad`` with
        an all-True mask up to rounding. ``None`` (the default): the loss has no fast path and
        the general one runs. Why: the general path spends ~20 passes over the ``[c, V]`` chunk
        on masking and autograd; at V=151936 that is a third of the matmul time (issue 13).
        """
        return None

    def chunk_rows(self, vocab_width: int) -> int:
        return self.chunk_size or max(1, CHUNK_ELEMENTS // max(vocab_width, 1))

    def describe(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.params)
        return f"{self.name}({args})"

    # ---- public paths ---------------------------------------------------------------------
    def __call__(
        self,
        student_logits: torch.Tensor,
        teacher: Teacher,
        mask: torch.Tensor,
        normalizer: Optional[float] = None,
        targets: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss averaged over response tokens from ready student logits ``[N, V]``.

        ``mask [N]`` selects response tokens (bool) or weights them (float). ``normalizer``
        overrides the divisor (default: the number of selected tokens), so micro-batches and
        ranks can share one global token count. ``targets [N]`` (long) are the response token ids
        each row predicts; only losses with ``uses_targets`` read them.
        """
        if student_logits.dim() != 2:
            raise LossInputError(f"student_logits must be [N, V]; got shape {tuple(student_logits.shape)}")
        signal = _check_signal(self, as_teacher_signal(teacher))
        weights, rows, norm = _token_weights(mask, student_logits.shape[0], signal.num_rows, normalizer)
        targets = _check_targets(self, targets, student_logits.shape[0])
        return _run(self, signal, weights, rows, norm, targets, _LogitsStudent(), student_logits)

    def fused(
        self,
        student_hidden: torch.Tensor,
        student_lm_head: torch.Tensor,
        teacher: Teacher,
        mask: torch.Tensor,
        student_bias: Optional[torch.Tensor] = None,
        normalizer: Optional[float] = None,
        targets: Optional[torch.Tensor] = None,
        student_transform=None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Same loss from student hidden states ``[N, d]`` and lm_head weight ``[V, d]``.

        Gradients flow to ``student_hidden``, ``student_lm_head`` and ``student_bias``; the full
        ``[N, V]`` logits are never formed. ``student_transform`` (csd_ray.logits.LogitTransform)
        maps the lm_head output to the model's logits (Gemma-2 softcapping, Granite/Cohere
        scaling); its exact derivative is applied chunk by chunk.
        """
        if student_hidden.dim() != 2 or student_lm_head.dim() != 2:
            raise LossInputError(
                f"student_hidden must be [N, d] and student_lm_head [V, d]; got "
                f"{tuple(student_hidden.shape)} and {tuple(student_lm_head.shape)}"
            )
        if student_hidden.shape[1] != student_lm_head.shape[1]:
            raise LossInputError(
                f"student_hidden has d={student_hidden.shape[1]} but student_lm_head has "
                f"d={student_lm_head.shape[1]}"
            )
        signal = _check_signal(self, as_teacher_signal(teacher))
        weights, rows, norm = _token_weights(mask, student_hidden.shape[0], signal.num_rows, normalizer)
        targets = _check_targets(self, targets, student_hidden.shape[0])
        tensors = (student_hidden, student_lm_head) + ((student_bias,) if student_bias is not None else ())
        transform = None if student_transform is None or student_transform.identity else student_transform
        return _run(self, signal, weights, rows, norm, targets, _LinearStudent(transform), *tensors)


def row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[c, 1]`` row-wise dot products of two ``[c, V]`` tensors, read once, no ``x * y`` buffer."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(-1, 1)


def softmax_backward_(q: torch.Tensor, g: torch.Tensor, temperature: float) -> torch.Tensor:
    """In place on ``g``: the gradient w.r.t. logits ``z`` of a loss whose gradient w.r.t.
    ``q = softmax(z / τ)`` is ``g``: ``q ⊙ (g − <q, g>) / τ``."""
    g.sub_(row_dot(q, g)).mul_(q)
    return g if temperature == 1.0 else g.div_(temperature)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; float64 inputs keep float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_signal(loss: DistillationLoss, signal: TeacherSignal) -> TeacherSignal:
    if isinstance(signal, TopKTeacher) and not loss.shift_invariant:
        raise LossInputError(
            f"{loss.name} compares raw logits, so it needs the 'logits' or 'hidden' teacher payload; "
            "the 'topk' payload carries log-probs"
        )
    if isinstance(signal, TopKTeacher) and loss.uses_targets:
        raise LossInputError(
            f"{loss.name} normalises the student over the whole vocabulary, so it needs the 'logits' or "
            "'hidden' teacher payload; the 'topk' payload restricts the student to an index set"
        )
    return signal


def _check_targets(loss: DistillationLoss, targets: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    if not loss.uses_targets:
        return None
    if targets is None:
        raise LossInputError(f"{loss.name} needs targets= (the [N] response token ids each row predicts)")
    if targets.dim() != 1 or targets.shape[0] != n or targets.dtype not in (torch.long, torch.int32, torch.int64):
        raise LossInputError(f"targets must be [N] integer token ids with N={n}; got {tuple(targets.shape)} {targets.dtype}")
    return targets


def _token_weights(
    mask: torch.Tensor, n_student: int, n_teacher: int, normalizer: Optional[float]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    if mask.dim() != 1 or mask.shape[0] != n_student:
        raise LossInputError(f"mask must be [N] with N={n_student} (student rows); got shape {tuple(mask.shape)}")
    if n_teacher != n_student:
        raise LossInputError(f"teacher has {n_teacher} rows but the student has {n_student}")
    weights = mask.detach().to(torch.float64)  # [N] only: exact division by the token count
    rows = weights.nonzero().squeeze(1)
    norm = float(rows.numel()) if normalizer is None else float(normalizer)
    if norm <= 0 and rows.numel() > 0:
        raise LossInputError(f"normalizer must be positive, got {normalizer}")
    return weights, rows, max(norm, 1.0)


def _align(
    z: torch.Tensor, t: torch.Tensor, ids: Optional[torch.Tensor], vocab_size: Optional[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upcast and cut the vocabulary to its real size."""
    dtype = compute_dtype(z.dtype)
    z, t = z.to(dtype), t.to(dtype)
    if ids is None:
        width = vocab_size
        if width is None:
            if z.shape[1] != t.shape[1]:
                raise LossInputError(
                    f"student logits have {z.shape[1]} vocabulary columns but the teacher's have "
                    f"{t.shape[1]}; pass vocab_size= (the real tokenizer length) to compare them"
                )
            width = z.shape[1]
        if z.shape[1] < width or t.shape[1] < width:
            raise LossInputError(
                f"vocab_size={width} but student logits have {z.shape[1]} and teacher logits {t.shape[1]} columns"
            )
        z, t = z[:, :width], t[:, :width]
    return z, t


def _valid(z: torch.Tensor, t: torch.Tensor, ids: Optional[torch.Tensor], vocab_size: Optional[int]) -> torch.Tensor:
    """``[c, V]`` True where an entry takes part: finite on both sides and inside the real vocabulary."""
    valid = torch.isfinite(z) & torch.isfinite(t)
    if ids is not None and vocab_size is not None:
        valid &= ids < vocab_size
    return valid


def _all_finite(z: torch.Tensor, t: torch.Tensor) -> bool:
    """True when no entry of z or t is ±inf or NaN: two read-only row sums instead of a [c, V]
    mask (a sum is finite exactly when its terms are, short of overflow, which only sends the
    chunk to the general path)."""
    return bool(torch.isfinite(z.sum(-1) + t.sum(-1)).all())


class _LogitsStudent:
    """Student given as ready logits: the chunk's logits are rows of the input."""

    def begin(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.vocab_width = logits.shape[1]
        self.grad = torch.zeros_like(logits, dtype=compute_dtype(logits.dtype))

    def chunk_logits(self, rows: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        z = self.logits[rows]
        return z if ids is None else z.gather(1, ids.clamp(0, z.shape[1] - 1))

    def backprop(self, rows: torch.Tensor, ids: Optional[torch.Tensor], g: torch.Tensor, w: torch.Tensor) -> None:
        g = g * w[:, None]
        if ids is None:
            self.grad[rows, : g.shape[1]] = g
        else:
            chunk = torch.zeros(rows.numel(), self.grad.shape[1], dtype=g.dtype, device=g.device)
            chunk.scatter_add_(1, ids.clamp(0, self.grad.shape[1] - 1), g)
            self.grad[rows] = chunk

    def grads(self) -> tuple[torch.Tensor, ...]:
        return (self.grad.to(self.logits.dtype),)


class _LinearStudent:
    """Student given as hidden states and lm_head: each chunk's logits are ``T(h @ W.T (+ b))``.

    ``T`` is the model's logit transform (None: identity); the chain rule through it happens
    here, so every loss keeps seeing plain logits and supplying only its math."""

    def __init__(self, transform=None) -> None:
        self.transform = transform
        self._derivative: Optional[torch.Tensor] = None  # dT/dx of the current chunk

    def _transformed(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is None:
            return x
        z = self.transform(x.to(compute_dtype(x.dtype)))
        self._derivative = self.transform.derivative_from_output(z)
        return z

    def _chain(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the raw lm_head output from the gradient w.r.t. the logits."""
        if self.transform is None:
            return g
        g = g * self.transform.scale if self._derivative is None else g * self._derivative[:, : g.shape[1]].to(g.dtype)
        self._derivative = None
        return g

    def begin(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.vocab_width = weight.shape[0]
        dtype = compute_dtype(hidden.dtype)
        self._weight_c: Optional[torch.Tensor] = None
        # CUDA has a bf16/fp16 GEMM with an fp32 output (torch.mm's out_dtype): exact products,
        # fp32 sums, no fp32 copy of the lm_head for the logits. Tried once per call.
        self._fp32_out_mm = hidden.is_cuda and hidden.dtype != dtype and weight.dtype == hidden.dtype
        self.grad_hidden = torch.zeros_like(hidden, dtype=dtype)
        self.grad_weight = torch.zeros_like(weight, dtype=dtype)
        self.grad_bias = None if bias is None else torch.zeros_like(bias, dtype=dtype)

    def _weight_compute(self) -> torch.Tensor:
        """The lm_head in the compute dtype, converted once per call rather than once per chunk
        (at V=151936 a bf16->fp32 copy of the lm_head costs as much as a chunk's matmul). Costs
        one [V, d] buffer, like the gradient, whatever the number of tokens."""
        if self._weight_c is None:
            self._weight_c = self.weight.to(compute_dtype(self.hidden.dtype))
        return self._weight_c

    def chunk_logits(self, rows: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        # Logits of bf16/fp16 inputs are formed in fp32: rounding them to bf16 would cost ~1e-2,
        # and torch has no bf16 matmul with an fp32 output on the CPU (aten::mm.dtype is CUDA only).
        dtype = compute_dtype(self.hidden.dtype)
        h = self.hidden[rows].to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if ids is None:
            z = None
            if self._fp32_out_mm:
                try:
                    z = torch.mm(self.hidden[rows], self.weight.t(), out_dtype=dtype)
                except (RuntimeError, TypeError):  # a torch without aten::mm.dtype
                    self._fp32_out_mm = False
            if z is None:
                z = h @ self._weight_compute().t()
            return self._transformed(z if bias is None else z + bias)
        safe = ids.clamp(0, self.weight.shape[0] - 1)
        # Only the index set's rows of the lm_head: K*d work per token instead of V*d.
        z = torch.einsum("cd,ckd->ck", h, self.weight[safe].to(dtype))
        return self._transformed(z if bias is None else z + bias[safe])

    def backprop(self, rows: torch.Tensor, ids: Optional[torch.Tensor], g: torch.Tensor, w: torch.Tensor) -> None:
        """Accumulate the gradients of ``sum_rows w_row * loss_row`` given ``g = d loss_row / d z``.

        The row weights ``w [c]`` scale the ``[c, d]`` operands, not the ``[c, V]`` gradient:
        diag(w) G W = diag(w) (G W) and (diag(w) G)^T h = G^T (diag(w) h)."""
        g = self._chain(g)
        h = self.hidden[rows].to(g.dtype)
        if ids is None:
            weight = self._weight_compute()
            width = g.shape[1]
            self.grad_hidden[rows] = (g @ weight[:width]).mul_(w[:, None])
            self.grad_weight[:width].addmm_(g.t(), h.mul_(w[:, None]))  # h: a fresh gather
            if self.grad_bias is not None:
                self.grad_bias[:width].addmv_(g.t(), w)
        else:
            g = g * w[:, None]
            weight = self.weight.to(g.dtype)
            safe = ids.clamp(0, weight.shape[0] - 1)
            self.grad_hidden[rows] = torch.einsum("ck,ckd->cd", g, weight[safe])
            self.grad_weight.index_add_(0, safe.reshape(-1), (g[:, :, None] * h[:, None, :]).reshape(-1, h.shape[1]))
            if self.grad_bias is not None:
                self.grad_bias.index_add_(0, safe.reshape(-1), g.reshape(-1))

    def grads(self) -> tuple[torch.Tensor, ...]:
        out = (self.grad_hidden.to(self.hidden.dtype), self.grad_weight.to(self.weight.dtype))
        return out if self.bias is None else out + (self.grad_bias.to(self.bias.dtype),)


def _run(loss, signal, weights, rows, norm, targets, student, *tensors) -> tuple[torch.Tensor, dict[str, float]]:
    metrics: dict[str, float] = {}
    value = _ChunkedLoss.apply(loss, signal, weights, rows, norm, targets, student, metrics, *tensors)
    return value, metrics


_NON_TENSOR_ARGS = 8  # loss, signal, weights, rows, norm, targets, student, metrics


def _chunk_loss_and_grad(loss, z, t, ids, targets, chunk_rows):
    """Per-row loss and gradient of one chunk: the loss's fast path when the chunk has no
    excluded entry (dense payloads, all logits finite), else the general masked path."""
    target_ids = None if targets is None else targets[chunk_rows].to(torch.long)
    if ids is None and _all_finite(z, t):
        if target_ids is None or bool(((target_ids >= 0) & (target_ids < z.shape[1])).all()):
            # z and t are this chunk's own buffers (a gather, a matmul or an upcast made them), so
            # the fast path may work in place.
            fast = loss.fast_loss_and_grad(z.contiguous(), t.contiguous(), target_ids)
            if fast is not None:
                return fast
    valid = _valid(z, t, ids, loss.vocab_size)
    if targets is None:
        return loss.token_loss_and_grad(z, t, valid)
    # One-hot over the chunk's columns (dense payloads only: the column is the token id).
    ids = target_ids
    target = torch.zeros_like(valid)
    target.scatter_(1, ids.clamp(0, valid.shape[1] - 1)[:, None], True)
    target &= ((ids >= 0) & (ids < valid.shape[1]))[:, None]
    if not bool((target & valid).any(1).all()):
        bad = ids[~(target & valid).any(1)][0]
        raise LossInputError(f"{loss.name}: target token {int(bad)} is outside the valid vocabulary (width {valid.shape[1]})")
    return loss.token_loss_and_grad(z, t, valid, target)


class _ChunkedLoss(torch.autograd.Function):
    """Runs the chunk loop in forward, keeping the (already scaled) input gradients for backward."""

    @staticmethod
    def forward(ctx, loss: DistillationLoss, signal, weights, rows, norm, targets, student, metrics, *tensors):  # type: ignore[override]
        if tensors[0].device.type == "cpu":
            keep_chunk_buffers_in_the_heap()
        student.begin(*(x.detach() for x in tensors))
        total = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
        with torch.no_grad():
            step = loss.chunk_rows(student.vocab_width)
            for start in range(0, rows.numel(), step):
                chunk_rows = rows[start : start + step]
                ids, t = signal.chunk(chunk_rows)
                z, t = _align(student.chunk_logits(chunk_rows, ids), t, ids, loss.vocab_size)
                per_row, grad = _chunk_loss_and_grad(loss, z, t, ids, targets, chunk_rows)
                w = (weights[chunk_rows] / norm).to(per_row.dtype)
                total += (w * per_row).sum().double()
                student.backprop(chunk_rows, ids, grad, w)
        ctx.grads = student.grads() if any(x.requires_grad for x in tensors) else None
        metrics.update(loss=float(total), tokens=float(rows.numel()))
        return total.to(compute_dtype(tensors[0].dtype))

    @staticmethod
    def backward(ctx, grad_value):  # type: ignore[override]
        grads = ctx.grads
        if grads is None:
            return (None,) * len(ctx.needs_input_grad)
        # Out of place: the stored gradients must survive for a second backward through a
        # retained graph (they are freed with the graph).
        return (None,) * _NON_TENSOR_ARGS + tuple(g * grad_value.to(g.dtype) for g in grads)
