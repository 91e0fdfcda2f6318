"""One FSDP2 trainer rank. N of these form one torch.distributed group (gloo on CPU, nccl on GPU).

The student is wrapped in ``StudentLoss`` (decoder -> fused chunked loss against the lm_head
weight) and sharded with ``fully_shard`` per decoder layer plus the root, so the lm_head weight
is unsharded exactly while the root's forward/backward runs and the [tokens x vocab] logits are
never formed.
"""

from __future__ import annotations

import math
import os
import socket
import time
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from csd_ray.config import Recipe
from csd_ray.devices import process_group_backend, role_device
from csd_ray.logits import LogitTransform, logit_transform, verify_logits
from csd_ray.losses import get_loss
from csd_ray.models import decoder_layers, dtype_of, load_model, load_tokenizer, position_ids
from csd_ray.rollout import Rollout, TeacherOutput, concat_rollouts, micro_batches, packed_layout, trimmed
from csd_ray.schema import to_dict
from csd_ray.export import export_hf_folder
from csd_ray.workers.hf_generate import actor_info, configure_process


class StaleRollout(RuntimeError):
    """A rollout older than the staleness bound reached the trainer (its sampler restarted)."""


PACKED_SDPA = "sdpa_packed"
"""transformers attention implementation: sdpa, run sequence by sequence on a packed row."""


def packed_sdpa_forward(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """transformers' sdpa attention, one call per packed sequence instead of one over the whole row.

    ``query``/``key``/``value`` [1, heads, L, head_dim] hold several sequences back to back; the
    block-diagonal mask transformers builds from restarting positions makes the other blocks
    zero-weight, so attending within each block (``cu_seq_lens_q`` [S+1]: cumulative lengths,
    the varlen convention of transformers' flash-attention kwargs) gives the same output at
    sum(l_i^2) instead of L^2 cost. A block whose mask is plain causal runs as ``is_causal``
    (the kernel then skips the upper triangle); any other (e.g. a sliding window) keeps its
    slice of the mask. Without ``cu_seq_lens_q`` this is transformers' sdpa unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:  # a sequence without tokens
            continue
        mask = None if attention_mask is None else attention_mask[..., a:b, a:b]
        if mask is not None and mask.dtype == torch.bool and torch.equal(
                mask, torch.ones(b - a, b - a, dtype=torch.bool, device=mask.device).tril().expand_as(mask)):
            mask = None
        parts.append(sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], mask,
                                            **kwargs)[0])
    return torch.cat(parts, dim=1), None


def _register_packed_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # the very masks sdpa gets


class StudentLoss(torch.nn.Module):
    """Student + loss as one module, so FSDP2 unshards the lm_head for the fused loss."""

    def __init__(self, model, loss, average: str = "token", packing: bool = True) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self.transform = logit_transform(model.config)  # the logits contract (csd_ray.logits)
        self.average = average  # "token": every response token counts once; "sequence": every sequence does
        self.packing = packing  # forward the real tokens as one packed row (no padding) instead of [B, T]
        if getattr(model.config, "_attn_implementation", None) == "sdpa":
            # Same kernel and masks; packed rows then attend sequence by sequence (packed_sdpa_forward).
            _register_packed_sdpa()
            model.set_attn_implementation(PACKED_SDPA)

    def hidden_rows(self, rollout: Rollout) -> torch.Tensor:
        """``[N, d]`` final hidden states at the loss rows (``rollout.target_mask()`` order)."""
        if self.packing:
            # No 2D mask and positions restarting per sequence: transformers detects the packed
            # sequences and builds a block-diagonal causal mask (sliding windows included).
            input_ids, positions, rows = packed_layout(rollout)
            lengths = rollout.attention_mask.sum(1)
            bounds = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            out = self.model.get_decoder()(input_ids=input_ids, attention_mask=None, position_ids=positions,
                                           use_cache=False, cu_seq_lens_q=bounds)
            return out.last_hidden_state[0, rows]
        rollout = trimmed(rollout)
        out = self.model.get_decoder()(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            position_ids=position_ids(rollout.attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state[:, :-1][rollout.target_mask()]

    def forward(self, rollout: Rollout, teacher: Optional[TeacherOutput] = None, teacher_lm_head=None,
                normalizer: float = 1.0):
        """(loss, metrics) against ``teacher``; without a teacher, the student's logits at the loss rows.

        Everything goes through forward so that FSDP2 has the root's parameters (lm_head) unsharded.
        """
        hidden = self.hidden_rows(rollout)
        head = self.model.get_output_embeddings()
        if teacher is None:
            return self.transform(head(hidden)).float()
        weights = torch.full((hidden.shape[0],), rollout.loss_weight, device=hidden.device)
        if self.average == "sequence":  # each sequence's tokens share its weight (per-sequence means)
            counts = rollout.target_mask().sum(1)
            weights = weights.double() / counts.clamp_min(1).repeat_interleave(counts).double()  # fp64: 1/7 in fp32 is off by 1e-8
        targets = rollout.input_ids[:, 1:][rollout.target_mask()]  # the token each loss row predicts
        return self.loss.fused(hidden, head.weight, teacher.signal(*(teacher_lm_head or (None, None))), weights,
                               student_bias=head.bias, normalizer=normalizer, targets=targets,
                               student_transform=self.transform)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainerRank:
    def __init__(self, recipe: Recipe, rank: int, world_size: int) -> None:
        configure_process(recipe.trainer.placement.torch_threads())
        self.recipe, self.rank, self.world_size = recipe, rank, world_size
        self.teacher_lm_head: Optional[tuple[torch.Tensor, LogitTransform]] = None
        self.version = 0

    # ---- setup ---------------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        import ray

        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def ready(self) -> dict:
        return actor_info(rank=self.rank)

    def init_group(self, master_addr: str, master_port: int) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        cfg = self.recipe.trainer
        self.device = role_device(cfg.placement.num_gpus, f"trainer rank {self.rank}")
        backend = process_group_backend(cfg.backend, self.device)
        if master_addr.startswith("127.") and backend == "gloo":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a loopback group stays on loopback
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
            world_size=self.world_size, timeout=timedelta(minutes=10), device_id=self.device if backend == "nccl" else None,
        )
        self.tokenizer = load_tokenizer(self.recipe.student_model)
        # Master weights are fp32 whatever the student's dtype; `param_dtype` sets the compute dtype.
        model = load_model(self.recipe.student_model, self.tokenizer, dtype="float32").train()
        verify_logits(model, f"student model '{self.recipe.student_model.path}'")
        self._losses: dict = {}
        if cfg.activation_checkpointing:  # recompute each decoder layer in backward (non-reentrant: FSDP2-safe)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.module = StudentLoss(model, self._loss(to_dict(cfg.loss)), cfg.loss.average, packing=cfg.packing).to(self.device)
        # bf16/fp16 compute with fp32 gradient reduction and fp32 master weights (FSDP2's mixed precision).
        mp = MixedPrecisionPolicy(param_dtype=dtype_of(cfg.param_dtype), reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=mp)
        fully_shard(self.module, mp_policy=mp)
        lr = self.recipe.stage_at(0).lr
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        total = self.recipe.run.steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total, cfg.lr_schedule)
        )

    def set_teacher_lm_head(self, head: tuple[torch.Tensor, dict]) -> None:
        """The teacher's lm_head ``[V, d]`` (kept in fp32 on this rank's device) and its logit transform."""
        weight, transform = head
        self.teacher_lm_head = (weight.to(self.device, torch.float32), LogitTransform(**transform))

    # ---- training ------------------------------------------------------------------------
    def _my_share(self, rollout: Rollout, teacher: TeacherOutput) -> tuple[Rollout, TeacherOutput]:
        per_rank = rollout.num_sequences // self.world_size
        lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank
        return rollout.select(lo, hi), teacher.select(lo, hi)

    def _loss(self, spec: dict):
        """The loss of a recipe's or a stage's ``loss`` section (as a dict), built once per spec."""
        key = repr(sorted(spec.items()))
        if key not in self._losses:
            self._losses[key] = get_loss(spec["name"], vocab_size=len(self.tokenizer),
                                         chunk_size=spec.get("chunk_size") or None, **spec.get("params", {}))
        return self._losses[key]

    def _use(self, loss: Optional[dict], lr: Optional[float]) -> None:
        """Switch to a stage's loss and peak learning rate (losses cached by their spec)."""
        if loss is not None:
            self.module.loss = self._loss(loss)
            self.module.average = loss.get("average", "token")
        if lr is not None:
            self.scheduler.base_lrs = [lr for _ in self.scheduler.base_lrs]
            # The scheduler set this step's lr from the previous base: apply the stage's now, or a
            # stage's lr would take effect one step late.
            factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * factor

    def train_step(self, groups: list[tuple[list, list, float]], loss: Optional[dict] = None,
                   lr: Optional[float] = None, min_rollout_version: Optional[int] = None) -> dict:
        """One optimizer step over every group (source) of a step: (rollout refs, teacher refs, loss weight).

        Student rollouts older than ``min_rollout_version`` are refused before any gradient is
        computed (a sampler that restarted samples with its initial weights)."""
        import ray

        t0 = time.perf_counter()
        batches = []
        for rollout_refs, teacher_refs, loss_weight in groups:
            # Checked before the teacher's payload is fetched: a stale group costs no transfer.
            rollout = fresh_rollout(ray.get(list(rollout_refs)), loss_weight, min_rollout_version)
            batches.append((rollout, concat_teacher_outputs(ray.get(list(teacher_refs)))))
        return self.train_on(batches, loss, lr, t_fetch=time.perf_counter() - t0)

    def accumulate_gradients(self, batches: list[tuple[Rollout, TeacherOutput]], normalizer: float) -> torch.Tensor:
        """Forward/backward of this rank's share of every batch, micro-batch by micro-batch.

        Gradients add up in ``.grad``; each micro-batch's loss is its sum over rows divided by the
        step's ``normalizer``, so the grouping into micro-batches changes nothing but rounding.
        Returns this rank's summed loss (fp64 scalar on the rank's device)."""
        cfg = self.recipe.trainer
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        for rollout, teacher in batches:
            mine, mine_teacher = self._my_share(rollout, teacher)
            limits = (cfg.micro_batch_size, cfg.micro_batch_tokens, self.module.packing)
            # Every rank sees the whole batch: all of them agree on the largest micro-batch count.
            per_rank = rollout.num_sequences // self.world_size
            count = max(len(micro_batches(rollout.select(r * per_rank, (r + 1) * per_rank), *limits))
                        for r in range(self.world_size))
            for start, stop in micro_batches(mine, *limits, at_least=count):
                part = _to(mine.select(start, stop), self.device)
                part_teacher = mine_teacher.select(start, stop).to(self.device)
                value, _ = self.module(part, part_teacher, self.teacher_lm_head, normalizer)
                value.backward()
                loss_sum += value.detach().double()
        return loss_sum

    def train_on(self, batches: list[tuple[Rollout, TeacherOutput]], loss: Optional[dict] = None,
                 lr: Optional[float] = None, t_fetch: float = 0.0) -> dict:
        """One optimizer step over fetched (rollout, teacher output) pairs; every rank sees the same batches."""
        self._use(loss, lr)
        t0 = time.perf_counter() - t_fetch
        total_tokens = sum(r.num_tokens() for r, _ in batches)
        # FSDP averages gradients over ranks: scale so the sum equals the global token mean.
        if self.module.average == "sequence":  # the mean of per-sequence means
            normalizer = max(sum(r.num_sequences for r, _ in batches), 1) / self.world_size
        else:
            normalizer = max(total_tokens, 1) / self.world_size
        loss_sum = self.accumulate_gradients(batches, normalizer)
        t_fwd_bwd = time.perf_counter() - t0 - t_fetch
        dist.all_reduce(loss_sum)
        loss_value = float(loss_sum) / self.world_size
        clip = self.recipe.trainer.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip if clip > 0 else float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]  # the lr this step applies
        if finite:
            self.optimizer.step()
            self.version += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        sampled = [r for r, _ in batches if r.sampled_logprobs is not None]
        student_versions = [r.weight_version for r, _ in batches if r.source == "student"]
        return {
            "loss": loss_value, "grad_norm": grad_norm, "lr": lr, "tokens": total_tokens,
            "sequences": sum(r.num_sequences for r, _ in batches), "skipped_nonfinite": not finite,
            "version": self.version, "rollout_version": min(student_versions) if student_versions else None,
            "sampled_logprob_mean": (
                float(sum(r.sampled_logprobs.sum() for r in sampled) / max(1, sum(r.num_tokens() for r in sampled)))
                if sampled else None
            ),
            "payload_bytes": sum(t.nbytes() for _, t in batches),
            "worker_pids": sorted(({r.worker_pid for r, _ in batches} | {t.worker_pid for _, t in batches}) - {0}),
            "time_sample": max(r.seconds for r, _ in batches), "time_score": max(t.seconds for _, t in batches),
            "time_fetch": t_fetch, "time_forward_backward": t_fwd_bwd,
            "time_optimizer": time.perf_counter() - t0 - t_fetch - t_fwd_bwd,
        }

    def load_checkpoint(self, path: str) -> int:
        """Restore weights, optimizer, scheduler and version from save_checkpoint's folder. Collective."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra = torch.load(f"{path}/trainer_state.pt", weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.version = extra["version"]
        return self.version

    def save_checkpoint(self, path: str) -> None:
        """Sharded checkpoint (torch.distributed.checkpoint) of weights, optimizer and scheduler. Collective."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
        if self.rank == 0:
            torch.save({"scheduler": self.scheduler.state_dict(), "version": self.version}, f"{path}/trainer_state.pt")
        dist.barrier()

    # ---- weights out ---------------------------------------------------------------------
    def full_state_dict(self, on_device: bool = False) -> Optional[dict]:
        """HF-named full state dict on rank 0 (CPU, or this rank's device); None on other ranks. Collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=not on_device)
        state = get_model_state_dict(self.module, options=options)
        if self.rank != 0:
            return None
        return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}

    def host_weights(self):
        """The full state dict in the form the object store moves cheaply (rank 0), in the
        sampler's dtype (student_model.dtype): a bf16 sampler gets half the bytes and loads
        them without a cast. Collective."""
        from csd_ray.weight_sync import HostWeights  # (lazily: Ray-free uses, e.g. scripts/gpu_check.py)

        state = self.full_state_dict()
        if state is None:
            return None
        dtype = dtype_of(self.recipe.student_model.dtype)
        return HostWeights.from_state_dict({k: v.to(dtype) for k, v in state.items()})

    def save_hf(self, path: str) -> Optional[str]:
        """Write an HF folder (model + tokenizer) from rank 0. Collective."""
        state = self.full_state_dict()
        if self.rank != 0:
            return None
        from transformers import AutoModelForCausalLM

        model = self.module.model
        with torch.device("meta"):
            clean = AutoModelForCausalLM.from_config(model.config)
        clean.load_state_dict(state, strict=False, assign=True)
        clean.tie_weights()
        export_hf_folder(clean, model, self.tokenizer, path, self.recipe)
        return path

    # ---- NCCL weight broadcast into vLLM workers (GPU) -------------------------------------
    def init_weight_broadcast(self, master_address: str, master_port: int, world_size: int) -> None:
        if self.rank == 0:
            from vllm.distributed.weight_transfer.nccl_common import trainer_init

            self.broadcaster = trainer_init(
                {"master_address": master_address, "master_port": master_port, "world_size": world_size}, rank=0
            )

    def weight_metadata(self) -> tuple[list[str], list[str], list[list[int]]]:
        """Names, dtypes and shapes of the full (HF-named) weights, in broadcast order.

        Weights travel in the sampler engine's dtype (student_model.dtype): a bf16 engine gets
        half the bytes of the fp32 master weights and no per-tensor dtype conversion."""
        params = {k.removeprefix("model."): p for k, p in self.module.state_dict().items() if k.startswith("model.")}
        names = sorted(params)
        dtype = self.recipe.student_model.dtype
        return names, [dtype] * len(names), [list(params[n].shape) for n in names]

    def broadcast_weights(self) -> None:
        """Gather the full weights on the GPU (all ranks) and broadcast them from rank 0 over NCCL."""
        state = self.full_state_dict(on_device=self.device.type == "cuda")
        if self.rank != 0:
            return
        dtype = dtype_of(self.recipe.student_model.dtype)
        stream = torch.cuda.current_stream()
        for name in self.weight_metadata()[0]:
            self.broadcaster.broadcast(state[name].to(self.device, dtype).contiguous(), src=0, stream=stream)
        stream.synchronize()

    def probe_logits(self, rollout: Rollout) -> Optional[torch.Tensor]:
        """Student logits at the loss rows (collective; every rank runs the same batch)."""
        with torch.no_grad():
            logits = self.module(_to(rollout, self.device))
        return logits.cpu() if self.rank == 0 else None

    def parameters_vector(self) -> Optional[torch.Tensor]:
        state = self.full_state_dict()
        if state is None:
            return None
        return torch.cat([state[k].flatten().double() for k in sorted(state)])

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def fresh_rollout(parts: list[Rollout], loss_weight: float, min_rollout_version: Optional[int]) -> Rollout:
    """One group's rollout shards joined, with the group's loss weight; raises StaleRollout for
    student samples older than ``min_rollout_version`` (None: no bound; other sources never age)."""
    rollout = concat_rollouts(parts)
    if min_rollout_version is not None and rollout.source == "student" and rollout.weight_version < min_rollout_version:
        raise StaleRollout(f"rollout sampled with weights v{rollout.weight_version} by pid {rollout.worker_pid}, "
                           f"older than the allowed v{min_rollout_version}")
    rollout.loss_weight = loss_weight
    return rollout


def concat_teacher_outputs(parts: list[TeacherOutput]) -> TeacherOutput:
    if len(parts) == 1:
        return parts[0]
    rows = {}
    for key in parts[0].rows:
        tensors = [p.rows[key] for p in parts]
        if key in ("ids", "logprobs"):  # top-k widths may differ between shards
            width = max(t.shape[1] for t in tensors)
            fill = 0 if key == "ids" else float("-inf")
            tensors = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in tensors]
        rows[key] = torch.cat(tensors)
    offsets, base = [torch.zeros(1, dtype=torch.long)], 0
    for p in parts:
        offsets.append(p.offsets[1:] + base)
        base += int(p.offsets[-1])
    return TeacherOutput(parts[0].payload, rows, torch.cat(offsets))


def _to(rollout: Rollout, device: torch.device) -> Rollout:
    if device.type == "cpu":
        return rollout
    for name in ("input_ids", "attention_mask", "response_mask"):
        setattr(rollout, name, getattr(rollout, name).to(device))
    return rollout
