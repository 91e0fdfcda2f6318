"""The controller: one loop that owns the run. A batch's path reads top to bottom in ``_step``:

    prompts -> sampler(s) (or teacher samples / dataset responses) -> teacher scoring
            -> trainer group (FSDP2 step) -> weight sync back to the sampler(s)

Only ObjectRefs pass through here; rollouts, teacher payloads and weights go actor to actor.
Sync mode runs those phases one after another. Async mode launches sampling for later steps
before training the current one, never further ahead than ``run.max_staleness`` versions.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import ray
import torch
import yaml

from csd_ray.adaptive import AdaptiveSchedule
from csd_ray.config import Recipe, SourceConfig, StageConfig
from csd_ray.data import PromptStream, load_prompts
from csd_ray.devices import actor_env
from csd_ray.evaluation import Evaluator, closing_table, format_eval, response_tokens
from csd_ray.metrics import MetricsLogger
from csd_ray.models import SMOLLM2, check_same_tokenizer, load_tokenizer, model_folder, preflight, resolve
from csd_ray.placement import plan
from csd_ray.rollout import Rollout, rollout_from_tokens
from csd_ray.schema import to_dict
from csd_ray.storage import check_output_dir, check_shared_output_dir
from csd_ray.weight_sync import make_transfer
from csd_ray.workers.group import TrainerGroup

class RunStopped(RuntimeError):
    """The run stopped early on purpose (signal, non-finite losses); the message says how to go on."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def fingerprint(recipe: Recipe) -> dict:
    """What a checkpoint must agree on to be resumed by this recipe."""
    s = recipe.student_model
    return {"student": s.path, "num_layers": s.num_layers, "keep_layers": list(s.keep_layers),
            "tiny": to_dict(s.tiny) if s.path == "tiny" else None, "trainer_ranks": recipe.trainer.num_ranks,
            "seed": recipe.run.seed}


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders that finished writing, oldest first (half-written ones never qualify)."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob("step_*") if (p / "COMPLETE").exists()] if root.exists() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


@dataclass
class Group:
    """One source's share of a step, in flight: refs only."""

    source: str
    rollouts: list
    teacher: list
    loss_weight: float
    rollout_id: int
    """Unique per launched group: a replayed step shows the id it was first trained with."""


@dataclass
class PlannedStep:
    index: int
    groups: list[Group]
    max_new_tokens: int
    replayed: bool = False
    stream_before: Optional[dict] = None
    """Prompt-stream position before this step drew its prompts (to redo lost work exactly)."""
    student_probability: Optional[float] = None
    """φ at this step, in a stage with an adaptive schedule (what its source was drawn with, or
    would have been for a replayed step)."""


class Controller:
    def __init__(self, recipe: Recipe, log=print) -> None:
        self.recipe = recipe
        self.run_dir = Path(recipe.run.output_dir)
        self.log = log
        self.step = 0
        self._sync_seconds = 0.0  # weight-sync time since the last logged step
        self.version = 0  # optimizer steps applied to the trainers' weights
        self.synced_version = 0  # newest version sent to the sampler(s)
        self.replay: deque[PlannedStep] = deque(maxlen=max(1, recipe.batch.replay.capacity))
        # Cached teacher responses (sources with `cache`): (greedy, max_new_tokens) -> prompt index
        # -> response token lists, each used once (a response made another way, or shorter, is never
        # served); a resumed or restarted run regenerates what it needs.
        self.teacher_cache: dict[tuple[bool, int], dict[int, list[list[int]]]] = {}
        self.adaptive: dict[int, AdaptiveSchedule] = {}  # stage index -> its schedule (stages with `adaptive`)
        self.samplers: list = []
        self.teachers: list = []
        self.trainers: Optional[TrainerGroup] = None
        self.stop_requested: Optional[str] = None  # set by a signal handler: stop after this step
        self.failures = {"sampler": 0, "teacher": 0, "trainer": 0}
        self.attempt = 0  # bumps on every recovery, so redone work gets new rollout ids
        self.nonfinite_in_a_row = 0
        self.resumed_from: Optional[Path] = None
        self.restored_evaluation: Optional[dict] = None  # the last evaluation before the checkpoint resumed from
        self.prepared = False

    # ---- set-up --------------------------------------------------------------------------
    def prepare(self) -> None:
        """Every check that needs no actor: resume point, model paths, tokenizers, data.

        Runs before Ray starts, so bad input fails in seconds with one message."""
        if self.prepared:
            return
        r = self.recipe
        check_output_dir(self.run_dir)
        self.resume = self._resume_point()
        for cfg in (r.student_model, r.teacher_model):
            if cfg.path != "tiny":
                resolve(cfg.path, need_model=False)
        self.tokenizer = load_tokenizer(r.student_model)
        teacher_tokenizer = load_tokenizer(r.teacher_model)
        check_same_tokenizer(self.tokenizer, teacher_tokenizer, r.student_model.path, r.teacher_model.path)
        for cfg in (r.student_model, r.teacher_model):
            if cfg.path == SMOLLM2 or cfg.path.endswith(".gguf"):
                # Convert the GGUF (and cut layers) once here: actors starting together would each
                # convert it again. Hub models and folders load as they are.
                model_folder(cfg)
        self.rules = preflight(r.student_model, self.tokenizer, "student_model")
        preflight(r.teacher_model, teacher_tokenizer, "teacher_model")
        self.prompts = load_prompts(r.data, self.tokenizer, seed=r.run.seed, end_id=self.rules.end_of_response_id)
        if self.prompts.dropped_too_long:
            self.log(f"data: dropped {self.prompts.dropped_too_long} prompts longer than {r.data.max_prompt_tokens} tokens")
        self.stream = PromptStream(self.prompts.train, seed=r.run.seed)
        self.log(f"data: {len(self.prompts.train)} training prompts, {len(self.prompts.eval)} held out")
        self.prepared = True

    def start(self) -> None:
        r = self.recipe
        self.prepare()
        resume = self.resume
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.yaml").write_text(yaml.safe_dump(to_dict(r), sort_keys=False))

        roles = {role.role: role for role in plan(r)}
        self.samplers = self._actors(_sampler_class(r), roles["sampler"])
        self.teachers = self._actors(_teacher_class(r), roles["teacher"])
        self.actor_info = {
            "sampler": ray.get([a.ready.remote() for a in self.samplers]),
            "teacher": ray.get([a.ready.remote() for a in self.teachers]),
        }
        self._start_trainers()
        check_shared_output_dir(self.run_dir, self.trainers.ranks)  # before any checkpoint is split over disks
        if resume is not None:
            self._restore(resume)
        self.metrics = MetricsLogger(r, self.run_dir, r.run.steps, self.step)
        if self.resumed_from is not None:
            self.metrics.message(f"resumed from {self.resumed_from} at step {self.step}")
        self.evaluator = None
        if self.prompts.eval:
            self.evaluator = Evaluator(self.prompts.eval, self.samplers[0], self.teachers[0], self.tokenizer,
                                       self.run_dir, r.run.eval_max_new_tokens, seed=r.run.seed + 99,
                                       stop_ids=self.rules.stop_ids, overlap=r.run.overlap_offpolicy)
        self.eval_history: list[dict] = []

    def _start_trainers(self) -> None:
        """The trainer group, with what it needs from the teacher, and the weight transfer bound to it."""
        r = self.recipe
        self.trainers = TrainerGroup(r, {role.role: role for role in plan(r)}["trainer"],
                                     actor_env(r.trainer.placement.num_gpus), name=ray_name(r, "trainer", first_actor="-0"))
        self.actor_info["trainer"] = self.trainers.info()
        self._write_actor_info()
        if r.teacher.payload == "hidden":  # (weight, logit transform) of the teacher's output layer
            self.trainers.call("set_teacher_lm_head", self.teachers[0].lm_head.remote())
        self.transfer = make_transfer(r)  # an NCCL transfer belongs to one trainer group

    def _write_actor_info(self) -> None:
        (self.run_dir / "actors.json").write_text(json.dumps(self.actor_info, indent=1))

    def _actors(self, cls, role) -> list:
        remote = ray.remote(cls)
        return [
            remote.options(
                num_cpus=role.placement.num_cpus, num_gpus=role.placement.num_gpus,
                resources=dict(role.placement.resources),
                runtime_env={"env_vars": actor_env(role.placement.num_gpus)},
                max_restarts=self.recipe.run.max_actor_restarts, max_task_retries=0,
                name=ray_name(self.recipe, f"{role.role}-{i}"),
            ).remote(self.recipe, i)
            for i in range(role.replicas)
        ]

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> Path:
        self.start()
        try:
            if self.resumed_from is None or self._adaptive_evaluation_due():
                self.evaluate()
            self.train()
            return self.finish()
        finally:
            self.shutdown()

    def evaluate(self) -> dict:
        """Held-out metrics of the current student (synced to the sampler first)."""
        if self.evaluator is None:
            return {}
        if self.synced_version != self.version:
            self._sync(block=True)
        t0 = time.perf_counter()
        metrics = self.evaluator.run(self.step)
        self._evaluated(metrics, time.perf_counter() - t0)
        return metrics

    def _evaluated(self, metrics: dict, seconds: float) -> None:
        """Book the held-out evaluation at ``self.step``: the adaptive schedule of the steps just
        trained reads it, metrics.jsonl and the console get it."""
        # The evaluation judges the steps just trained: their stage's adaptive schedule takes it.
        schedule = self._schedule(self.step - 1) if self.step > 0 else None
        if schedule is not None and schedule.observe(metrics.get(schedule.config.metric)):
            r = self.recipe
            more = self.step < r.run.steps and r.stage_index(self.step) == r.stage_index(self.step - 1)
            consequence = (f"student samples now drawn with probability {schedule.probability:.2f}" if more else
                           f"φ {schedule.probability:.2f}, but no step of the stage is left to draw")
            self.metrics.message(f"adaptive: held-out {schedule.config.metric} rose to {schedule.reference:.3f}; {consequence}")
        self.eval_history.append({"step": self.step, **metrics})
        self.metrics.log({"kind": "eval", "step": self.step, **{f"eval/{k}": v for k, v in metrics.items()},
                          "eval/seconds": seconds})
        self.metrics.message(f"eval step {self.step}: {format_eval(metrics)}")

    def train(self) -> None:
        run = self.recipe.run
        self._last_step_end = time.perf_counter()
        while self.step < run.steps:
            pending: deque[PlannedStep] = deque()
            self._pending = pending  # a checkpoint records where the first untrained step's prompts begin
            next_launch = self.step
            next_prompts = self.stream.state()  # where the next untrained step's prompts begin
            try:
                while self.step < run.steps:
                    while next_launch < run.steps and self._may_launch(next_launch):
                        pending.append(self._launch(next_launch))
                        next_launch += 1
                    if not pending:  # the sampler's weights are too old for even the next step
                        self._sync(block=True)
                        continue
                    self._step(pending.popleft())
                    next_prompts = pending[0].stream_before if pending else self.stream.state()
            except ray.exceptions.RayError as exc:
                self._recover(exc, next_prompts)  # in-flight work is dropped; relaunched from self.step

    # ---- failures ------------------------------------------------------------------------------
    def _known_pids(self) -> set[int]:
        return {a["pid"] for role in ("sampler", "teacher") for a in self.actor_info[role]}

    def _count_failures(self, dead: dict[str, str], cause: str) -> None:
        for role in dead:
            self.failures[role] += 1
            if self.failures[role] > self.recipe.run.max_actor_restarts:
                raise RunStopped(f"the {role} failed {self.failures[role]} times (run.max_actor_restarts="
                                 f"{self.recipe.run.max_actor_restarts}); last error: {cause}", exit_code=4)

    def _note_restarts(self) -> None:
        """Actors that died and came back between tasks, losing nothing: count and log them."""
        dead = self._failed_roles()
        self._count_failures(dead, "; ".join(dead.values()))
        if dead:
            self.metrics.log({"kind": "restart", "step": self.step, "roles": sorted(dead), "cause": "; ".join(dead.values())})
            if "sampler" in dead:
                self.synced_version = -1  # it lost its weights
                self.transfer = make_transfer(self.recipe)  # and its side of an NCCL group

    def _recover(self, exc: Exception, next_prompts: dict) -> None:
        """An actor died: restart what can be restarted and rewind to redo what was lost."""
        dead = self._failed_roles()
        if not dead:
            raise exc  # not an actor failure: a real error, shown as is
        self._count_failures(dead, _first_line(exc))
        self.attempt += 1
        if "trainer" in dead:
            self._rebuild_trainers(dead["trainer"])
        else:
            self.stream.load_state(next_prompts)  # the lost steps draw the same prompts again
            self.metrics.log({"kind": "restart", "step": self.step, "roles": sorted(dead), "cause": _first_line(exc)})
            self.metrics.message(f"restarted {', '.join(sorted(dead))} after: {_first_line(exc)}; redoing step {self.step + 1}")
        self._sync_refs = []  # a sync in flight may involve the dead actor
        if "sampler" in dead:
            self.transfer = make_transfer(self.recipe)  # an NCCL group dies with its vLLM worker: form a new one
        self.synced_version = -1
        if self.samplers:
            self._sync(block=True)  # restarted samplers start from their initial weights

    def _failed_roles(self) -> dict[str, str]:
        """Roles with an actor that died since start (a restarted actor answers with a new pid)."""
        dead: dict[str, str] = {}
        for role, actors in (("sampler", self.samplers), ("teacher", self.teachers)):
            for actor, before in zip(actors, self.actor_info[role]):
                try:
                    now = _ping(actor, timeout=600)
                except ray.exceptions.RayError as err:  # out of restarts
                    dead[role] = _first_line(err)
                    continue
                if now["pid"] != before["pid"]:
                    dead[role] = f"pid {before['pid']} died, restarted as pid {now['pid']}"
                    before.update(now)
        for rank, actor in enumerate(self.trainers.ranks):
            try:
                ray.get(actor.ready.remote(), timeout=60)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as err:
                dead["trainer"] = f"rank {rank}: {_first_line(err)}"
        if dead:
            self._write_actor_info()
        return dead

    def _rebuild_trainers(self, cause: str) -> None:
        """A rank died: a new group, restored from the last complete checkpoint (or the start)."""
        self.trainers.shutdown()
        self._start_trainers()
        found = complete_checkpoints(self.run_dir)
        if found:
            self._restore(found[-1])
        else:
            self.step, self.version = 0, 0
            self.stream.load_state({"epoch": 0, "cursor": 0})
            self.adaptive.clear()
        self.metrics.log({"kind": "rollback", "step": self.step, "roles": ["trainer"], "cause": cause})
        self.metrics.message(f"trainer group rebuilt after: {cause}; continuing from step {self.step}")

    def _may_launch(self, index: int) -> bool:
        """Whether step ``index``'s responses can be produced now.

        Teacher and dataset responses do not depend on the student, so they are produced one step
        ahead in any mode (overlapping training). Student samples: in sync mode only once the
        previous step has trained; in async mode up to ``max_staleness`` steps ahead, as long as
        the weights they would be sampled with are at most that many versions old.
        """
        run = self.recipe.run
        on_policy = any(s.kind == "student" for s in self.recipe.stage_at(index).sources)
        if not on_policy:
            return index <= self.step + (1 if run.overlap_offpolicy else 0)
        if run.mode == "sync":
            return index <= self.step
        # Staleness counts optimizer steps (versions), not step indices: skipped non-finite steps
        # apply no update. Step `index` trains on weights at most `index - self.step` versions
        # newer than now, and samples with the weights last synced.
        newest_at_training = self.version + (index - self.step)
        return index <= self.step + run.max_staleness and self.synced_version >= newest_at_training - run.max_staleness

    def _step(self, planned: PlannedStep) -> None:
        t0 = time.perf_counter()
        version_before = self.version
        stage = self.recipe.stage_at(planned.index)
        results = self.trainers.call("train_step", [(g.rollouts, g.teacher, g.loss_weight) for g in planned.groups],
                                     to_dict(stage.loss), stage.lr, self._oldest_allowed(planned))
        self._trained(planned, results[0], version_before, time.perf_counter() - t0)

    def _oldest_allowed(self, planned: PlannedStep) -> Optional[int]:
        """The oldest weight version ``planned``'s student samples may come from (None: any, for a
        replayed step): async mode allows ``max_staleness`` versions, sync mode the versions
        between two weight syncs."""
        run = self.recipe.run
        allowed = run.max_staleness if run.mode == "async" else run.weight_sync_every - 1
        return None if planned.replayed else self.version - allowed

    def _trained(self, planned: PlannedStep, result: dict, version_before: int, t_train: float) -> None:
        """Book a step the trainers finished: ``result`` is rank 0's train_step answer; the record goes
        to metrics.jsonl; stops (non-finite streak, signal) and periodic checkpoints/evaluations follow."""
        run = self.recipe.run
        stage = self.recipe.stage_at(planned.index)
        self.version = result["version"]
        staleness = version_before - result["rollout_version"] if result["rollout_version"] is not None else 0
        if set(result["worker_pids"]) - self._known_pids():  # an actor restarted between tasks, losing nothing
            self._note_restarts()
        if self.recipe.batch.replay.capacity and not planned.replayed:
            self.replay.append(planned)
        if run.mode == "async":  # keep the sampler as fresh as the staleness bound requires
            self._sync(block=False)
        t_sync, self._sync_seconds = self._sync_seconds, 0.0
        self.step = planned.index + 1
        step_time = time.perf_counter() - self._last_step_end
        record = {
            "kind": "train", "step": self.step, "stage": stage.name, "loss_name": stage.loss.name,
            "loss": result["loss"], "grad_norm": result["grad_norm"],
            "lr": result["lr"], "tokens": result["tokens"], "sequences": result["sequences"],
            "mean_response_tokens": result["tokens"] / max(1, result["sequences"]),
            "sources": [g.source for g in planned.groups], "replayed": planned.replayed,
            "student_probability": planned.student_probability,
            "max_new_tokens": planned.max_new_tokens, "weight_version": self.version,
            "rollout_version": result["rollout_version"], "staleness": staleness,
            "skipped_nonfinite": result["skipped_nonfinite"], "sampled_logprob_mean": result["sampled_logprob_mean"],
            "payload_bytes": result["payload_bytes"], "rollout_ids": [g.rollout_id for g in planned.groups],
            "time_sample": result["time_sample"], "time_score": result["time_score"], "time_train": t_train,
            "time_trainer_forward_backward": result["time_forward_backward"], "time_sync": t_sync,
            "step_time": step_time, "tokens_per_s": result["tokens"] / max(step_time, 1e-9),
        }
        self.metrics.log(record)
        self._last_step_end = time.perf_counter()
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if result["skipped_nonfinite"] else 0
        if self.nonfinite_in_a_row >= run.max_nonfinite_steps:
            raise RunStopped(
                f"stopped: {self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (each was "
                f"skipped; last loss {result['loss']}, grad norm {result['grad_norm']}). Lower trainer.lr, check the "
                "data, or raise run.max_nonfinite_steps", exit_code=3)
        if self.stop_requested and self.step < run.steps:
            path = self.checkpoint()
            raise RunStopped(
                f"{self.stop_requested}: stopped after step {self.step}/{run.steps}; checkpoint {path}. Resume by "
                "running the same command again (same run.output_dir; run.resume=auto)", exit_code=143)
        if self._periodic(run.checkpoint_every):
            self.checkpoint()
        if self._periodic(run.eval_every):
            self.evaluate()

    def _periodic(self, every: int) -> bool:
        """Whether a periodic checkpoint or evaluation (each ``every`` steps; 0: never) follows the
        step just trained: not after the run's last step, where finish() makes both."""
        return bool(every) and self.step % every == 0 and self.step < self.recipe.run.steps

    # ---- launching a step's work -----------------------------------------------------------
    def _launch(self, index: int) -> PlannedStep:
        planned, sources = self._plan(index)
        if sources:
            planned.groups = [self._launch_source(src, index, planned.max_new_tokens, self.attempt * 1_000_000 + index * 16 + k)
                              for k, src in enumerate(sources)]
        return planned

    def _plan(self, index: int) -> tuple[PlannedStep, list[SourceConfig]]:
        """Step ``index`` before any work is launched: a replay of an old step (its groups, no
        sources), or a new step (no groups yet) and the sources it draws from (``_step_rng``)."""
        r = self.recipe
        rng = self._step_rng(index)
        stage = r.stage_at(index)
        stream_before = self.stream.state()
        schedule = self._schedule(index)
        phi = schedule.probability if schedule else None  # logged for a replayed step too: φ at every step of the stage
        sources = self._draw(rng, stage, bool(self.replay), schedule)
        if sources is None:
            old = rng.choice(list(self.replay))
            return PlannedStep(index, old.groups, old.max_new_tokens, replayed=True, stream_before=stream_before,
                               student_probability=phi), []
        planned = PlannedStep(index, [], self._max_new_tokens(index, stage.max_new_tokens), stream_before=stream_before,
                              student_probability=phi)
        return planned, sources

    def _step_rng(self, index: int) -> random.Random:
        """Step ``index``'s draws (replay, source): seeded by ``run.seed`` and the step, so a resumed
        or redone step, and the cache's look-ahead, draw the same."""
        return random.Random(self.recipe.run.seed * 7919 + index)

    def _draw(self, rng: random.Random, stage: StageConfig, replay_filled: bool,
              schedule: Optional[AdaptiveSchedule]) -> Optional[list[SourceConfig]]:
        """A step's draw with its ``rng``: None for a replay (possible once the buffer holds a step),
        else the sources it trains on (source_mode 'all': each; 'sample': one, by probability, or
        by φ of the stage's adaptive ``schedule``). _plan makes the draws; the teacher cache
        predicts them with it."""
        if replay_filled and rng.random() < self.recipe.batch.replay.probability:
            return None
        if stage.source_mode == "all":
            return list(stage.sources)
        weights = schedule.weights(stage.sources) if schedule else [s.probability for s in stage.sources]
        return [rng.choices(stage.sources, weights=weights)[0]]

    def _adaptive_evaluation_due(self) -> bool:
        """Whether a resumed run must redo the evaluation at its checkpoint's step: an adaptive
        schedule reads it (that of the steps just trained, or, at an adaptive stage's first step, as
        its reference), and the original run made it just after writing the checkpoint (or, stopped
        by a signal, never made it, where an uninterrupted run would have)."""
        stages = (self.recipe.stage_at(self.step - 1), self.recipe.stage_at(self.step))
        return (self.step > 0 and self._periodic(self.recipe.run.eval_every)
                and any(stage.adaptive is not None for stage in stages))

    def _schedule(self, index: int) -> Optional[AdaptiveSchedule]:
        """The adaptive schedule of step ``index``'s stage, if it has one; made when the stage's
        first step launches, with the last evaluation before it as the reference."""
        stage = self.recipe.stage_at(index)
        if stage.adaptive is None:
            return None
        key = self.recipe.stage_index(index)
        if key not in self.adaptive:
            initial = next(s.probability for s in stage.sources if s.kind == "student")
            last = self._last_evaluation(index)
            self.adaptive[key] = AdaptiveSchedule(stage.adaptive, initial, last.get(stage.adaptive.metric) if last else None)
        return self.adaptive[key]

    def _last_evaluation(self, step: int) -> Optional[dict]:
        """The newest evaluation made at or before ``step`` (its metrics, with "step"): this run's,
        or before it resumed, the one its checkpoint kept; None if there was none."""
        made = [h for h in getattr(self, "eval_history", []) if h["step"] <= step]
        return made[-1] if made else self.restored_evaluation

    def _max_new_tokens(self, index: int, limit: int) -> int:
        cur = self.recipe.batch.curriculum
        if not cur.start_tokens or not cur.warmup_steps:
            return limit
        frac = min(1.0, index / cur.warmup_steps)
        return int(round(min(cur.start_tokens, limit) + frac * (limit - min(cur.start_tokens, limit))))

    def _launch_source(self, src: SourceConfig, index: int, max_new: int, rollout_id: int) -> Group:
        b = self.recipe.batch
        examples = self.stream.next_batch(b.prompts_per_step)
        examples = [e for e in examples for _ in range(b.samples_per_prompt)]
        prompts = [e.prompt_ids for e in examples]
        indices = [e.index for e in examples]
        seed = self.recipe.run.seed * 1_000_003 + index * 101
        if src.kind == "dataset" or src.cache:
            if src.kind == "teacher":
                self._fill_teacher_cache(src, examples, index, seed)
            rollout_refs = [ray.put(self._offpolicy_rollout(src, examples, index, max_new))]
        else:
            if src.kind == "student" and self.version - self.synced_version >= self.recipe.run.weight_sync_every:
                self._sync(block=True)  # sync mode: weights move only when the sampler needs them
            actors = self.samplers if src.kind == "student" else self.teachers
            rollout_refs = [
                actor.generate.remote(prompts[lo:hi], indices[lo:hi], max_new, seed + i, greedy=src.greedy)
                for i, (actor, lo, hi) in enumerate(_shards(actors, len(prompts)))
            ]
        teacher_refs = [self.teachers[i % len(self.teachers)].score.remote(ref) for i, ref in enumerate(rollout_refs)]
        return Group(src.kind, rollout_refs, teacher_refs, src.loss_weight, rollout_id)

    def _offpolicy_rollout(self, src: SourceConfig, examples: list, index: int, max_new: int) -> Rollout:
        """The rollout of a source whose responses exist before the step: the dataset's references,
        or (``cache``) the teacher's responses taken from the cache, each used once; cut to
        ``max_new`` tokens (a curriculum's shorter steps). Step ``index``'s teacher responses must be
        in the cache (``_fill_teacher_cache``)."""
        if src.kind == "dataset":
            missing = [e.index for e in examples if e.response_ids is None]
            if missing:
                raise RuntimeError(f"the 'dataset' source needs reference responses; example {missing[0]} has none")
            responses = [e.response_ids for e in examples]
        else:
            cache = self._teacher_cache(src, index)
            responses = [cache[e.index].pop(0) for e in examples]
            for i in {e.index for e in examples}:
                if not cache[i]:
                    del cache[i]
        return rollout_from_tokens([e.prompt_ids for e in examples], [r[:max_new] for r in responses], self.rules.pad_id,
                                   weight_version=self.version, source=src.kind, prompt_indices=[e.index for e in examples])

    def _fill_teacher_cache(self, src: SourceConfig, examples: list, index: int, seed: int) -> None:
        """Make sure the cache holds a teacher response for each of ``examples``: if one is missing,
        the teacher replicas generate, in one large batch each, what ``_cache_todo`` lists."""
        todo = self._cache_todo(src, examples, index)
        if not todo:
            return
        max_new = self.recipe.stage_at(index).max_new_tokens
        prompts = [e.prompt_ids for e in todo]
        t0 = time.perf_counter()
        refs = [actor.generate.remote(prompts[lo:hi], [e.index for e in todo[lo:hi]], max_new, seed + i, greedy=src.greedy)
                for i, (actor, lo, hi) in enumerate(_shards(self.teachers, len(prompts)))]
        cache = self._teacher_cache(src, index)
        for rollout in ray.get(refs):
            for prompt_index, tokens in zip(rollout.prompt_indices, response_tokens(rollout)):
                cache.setdefault(prompt_index, []).append(tokens)
        self.metrics.message(f"teacher responses: {len(prompts)} generated in {time.perf_counter() - t0:.1f} s "
                             f"({len(self.teachers)} replica(s)), cached for the next steps")

    def _teacher_cache(self, src: SourceConfig, index: int) -> dict[int, list[list[int]]]:
        """The cached responses ``src`` serves at step ``index``: keyed by (greedy, the stage's
        ``max_new_tokens``), so one made another way, or shorter, is never served."""
        return self.teacher_cache.setdefault((src.greedy, self.recipe.stage_at(index).max_new_tokens), {})

    def _cache_todo(self, src: SourceConfig, examples: list, index: int) -> list:
        """The examples (one per response) the teacher must answer before step ``index`` can take
        ``examples``' responses from the cache: nothing when all are there; otherwise what this step
        and ``src``'s next ``src.cache`` prompts of the stage still lack (``samples_per_prompt``
        responses per prompt), in stream order. Cached responses are keyed by (greedy, the stage's
        ``max_new_tokens``): one made another way, or shorter, is never served."""
        cache = self._teacher_cache(src, index)
        need = Counter(e.index for e in examples)
        if all(len(cache.get(i, ())) >= n for i, n in need.items()):
            return []
        spp = self.recipe.batch.samples_per_prompt
        wanted = examples + [e for e in self._upcoming_for_source(src, index) for _ in range(spp)]
        need = Counter(e.index for e in wanted)
        todo, seen = [], set()
        for e in wanted:
            if e.index not in seen:
                seen.add(e.index)
                todo += [e] * max(0, need[e.index] - len(cache.get(e.index, ())))
        return todo

    def _upcoming_for_source(self, src: SourceConfig, index: int) -> list:
        """The prompts ``src`` will draw after its draw of step ``index``, at most ``src.cache`` of
        them and none beyond the stage, without moving the stream. The later steps' draws are
        made as _plan will make them (same seeds): a replayed step draws no prompts; with
        source_mode 'all' each source draws ``prompts_per_step`` in list order, with 'sample' the
        drawn source does. In an adaptive stage only up to the next evaluation, which may change φ."""
        r = self.recipe
        stage, per = r.stage_at(index), r.batch.prompts_per_step
        end = 0
        for s in r.stages:  # the first step after this stage
            end += s.steps
            if index < end:
                break
        else:
            end = r.run.steps
        if stage.adaptive is not None:  # φ changes only at an evaluation: the draws are known up to the next one
            end = min(end, (index // r.run.eval_every + 1) * r.run.eval_every)
        if src.cache <= 0 or index + 1 >= end:
            return []
        if not any(s is src for s in stage.sources):  # not one of the stage's own sources: no pattern to follow
            return self.stream.peek(min(src.cache, (end - index - 1) * per))
        schedule = self.adaptive.get(r.stage_index(index))
        # Off-policy steps launch one step ahead (overlap_offpolicy): step j starts once the steps
        # before j - ahead have trained, and the replay buffer holds a step once one has trained.
        on_policy = any(s.kind == "student" for s in stage.sources)
        ahead = 1 if not on_policy and r.run.overlap_offpolicy else 0
        offset, positions = 0, []  # stream positions from here on; those src draws
        if stage.source_mode == "all":  # the sources after src in step index's list draw first
            offset = per * (len(stage.sources) - 1 - next(k for k, s in enumerate(stage.sources) if s is src))
        for j in range(index + 1, end):
            if len(positions) >= src.cache:
                break
            filled = bool(self.replay) or (r.batch.replay.capacity > 0 and j - ahead > self.step)
            for drawn in self._draw(self._step_rng(j), stage, filled, schedule) or []:
                if drawn is src:
                    positions += range(offset, offset + per)
                offset += per
        ahead_examples = self.stream.peek(offset)
        return [ahead_examples[o] for o in positions[: src.cache]]

    # ---- weights, checkpoints, the end ---------------------------------------------------------
    def _sync(self, block: bool) -> float:
        """Send the trainers' weights to the sampler(s). Every sync is awaited within
        ``sampler.weight_sync_timeout_s``: a blocking one now, a non-blocking one by the next sync."""
        t0 = time.perf_counter()
        self._await_sync()
        self._sync_refs, self._sync_started = self.transfer.push(self.trainers, self.samplers, self.version), t0
        self.synced_version = self.version
        if block:
            self._await_sync()
        seconds = time.perf_counter() - t0
        self._sync_seconds += seconds
        return seconds

    def _await_sync(self) -> None:
        refs, self._sync_refs = getattr(self, "_sync_refs", []), []
        if not refs:
            return
        timeout = self.recipe.sampler.weight_sync_timeout_s
        deadline = self._sync_started + timeout
        pending = list(refs)
        while pending:  # fail fast: the first side to fail raises at once, its peer may be stuck in NCCL
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.perf_counter()))
            if done:
                ray.get(done)
                continue
            raise RunStopped(
                f"weight sync ({self.transfer.name}) did not finish within sampler.weight_sync_timeout_s={timeout:g} s; "
                "a sampler or trainer rank is stuck or died mid-transfer", exit_code=1) from None

    def checkpoint(self) -> Path:
        """Sharded checkpoint of the trainers plus the controller's own state, made visible atomically."""
        root = self.run_dir / "checkpoints"
        final = root / f"step_{self.step:06d}"
        tmp = root / f".tmp-step_{self.step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.trainers.call("save_checkpoint", str(tmp))
        return self._publish_checkpoint(tmp, final)

    def _publish_checkpoint(self, tmp: Path, final: Path) -> Path:
        """Add the controller's state to the trainers' checkpoint in ``tmp``, mark it complete and
        move it to ``final`` (a reader never sees a half-written one); drop the oldest beyond
        ``run.keep_checkpoints``."""
        # Steps launched ahead (async, off-policy overlap) drew their prompts already: a resumed run
        # must draw them again, so the checkpoint keeps the stream where the first untrained step began.
        pending = getattr(self, "_pending", None)
        stream = pending[0].stream_before if pending else self.stream.state()
        state = {"step": self.step, "version": self.version, "stream": stream,
                 "adaptive": {str(k): v.state() for k, v in self.adaptive.items()},
                 # A stage's schedule not made yet takes the last evaluation before it as reference.
                 "last_eval": self._last_evaluation(self.step)}
        state["fingerprint"] = fingerprint(self.recipe)
        (tmp / "controller.json").write_text(json.dumps(state))
        if self.replay:  # a resumed run must replay the same rollouts with the same draws
            torch.save([_materialise(p) for p in self.replay], tmp / "replay.pt")
        (tmp / "COMPLETE").write_text("ok\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(self.run_dir)[: -self.recipe.run.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _resume_point(self) -> Optional[Path]:
        """The checkpoint to continue from, checked against this recipe before anything starts."""
        from csd_ray.schema import ConfigError

        setting = self.recipe.run.resume
        found = complete_checkpoints(self.run_dir)
        if setting == "never":
            if found:
                raise ConfigError(f"{self.run_dir} already holds checkpoints ({found[-1].name}); use another "
                                  "run.output_dir or run.resume=auto to continue it", key="run.resume")
            return None
        path = Path(setting) if setting != "auto" else (found[-1] if found else None)
        if path is None:
            return None
        state_file = path / "controller.json"
        if not (path / "COMPLETE").exists() or not state_file.exists():
            raise ConfigError(f"{path} is not a complete csd_ray checkpoint (no COMPLETE marker)", key="run.resume")
        state = json.loads(state_file.read_text())
        theirs, mine = state.get("fingerprint", {}), fingerprint(self.recipe)
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: checkpoint {a!r}, recipe {b!r}" for k, (a, b) in diff.items())
            raise ConfigError(f"{path} belongs to an incompatible run ({detail}); use another run.output_dir or "
                              "run.resume=PATH", key="run.resume")
        if state["step"] > self.recipe.run.steps:
            raise ConfigError(f"{path} is at step {state['step']}, beyond run.steps={self.recipe.run.steps}", key="run.steps")
        return path

    def _restore(self, path: Path) -> None:
        self._restored(path, self.trainers.call("load_checkpoint", str(path)))

    def _restored(self, path: Path, versions: list[int]) -> None:
        """Take the controller's side of checkpoint ``path`` after the trainers loaded theirs
        (``versions``: each rank's restored weight version)."""
        state = json.loads((path / "controller.json").read_text())
        self.step, self.version = state["step"], versions[0]
        self.stream.load_state(state["stream"])
        self.adaptive.clear()
        self.restored_evaluation = state.get("last_eval")
        stages = self.recipe.stages
        for key, saved in state.get("adaptive", {}).items():
            if int(key) < len(stages) and stages[int(key)].adaptive is not None:  # (the recipe may have changed since)
                self.adaptive[int(key)] = AdaptiveSchedule(stages[int(key)].adaptive, 0.0)
                self.adaptive[int(key)].load_state(saved)
        self.replay.clear()
        if (path / "replay.pt").exists():
            self.replay.extend(_from_disk(p) for p in torch.load(path / "replay.pt", weights_only=False))
        self.synced_version = -1  # the samplers still hold their initial weights
        self.resumed_from = path

    def finish(self) -> Path:
        self.checkpoint()
        final = self.run_dir / "final"
        shutil.rmtree(final, ignore_errors=True)
        self.trainers.call("save_hf", str(final))
        self.evaluate()
        if len(self.eval_history) >= 2:  # student before/after beside the teacher, and a few answers
            table = closing_table(self.eval_history[0], self.eval_history[-1], self.evaluator.last_side_by_side[:4])
            self.metrics.message("held-out evaluation:\n" + table)
        self.metrics.message(f"done: {self.step} steps; student written to {final}")
        if self.recipe.run.push_to_hub:
            from csd_ray.export import push_to_hub

            try:
                push_to_hub(final, self.recipe, log=self.metrics.message)
            except Exception as exc:  # the Hub's errors (auth, network): the folder is safe on disk
                raise RunStopped(f"upload to {self.recipe.run.push_to_hub} failed: {_first_line(exc)}; the student "
                                 f"is in {final} (upload it with `hf upload {self.recipe.run.push_to_hub} {final}`)",
                                 exit_code=5) from None
        return final

    def shutdown(self) -> None:
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if self.trainers is not None:
            self.trainers.shutdown()
        for actor in self.samplers + self.teachers:
            ray.kill(actor)


def _materialise(planned: PlannedStep) -> PlannedStep:
    """A replay entry with its rollouts and teacher outputs fetched (for a checkpoint)."""
    groups = [Group(g.source, ray.get(list(g.rollouts)), ray.get(list(g.teacher)), g.loss_weight, g.rollout_id)
              for g in planned.groups]
    return PlannedStep(planned.index, groups, planned.max_new_tokens, planned.replayed, planned.stream_before)


def _from_disk(planned: PlannedStep) -> PlannedStep:
    """The inverse of _materialise: objects back into the object store, as refs."""
    groups = [Group(g.source, [ray.put(r) for r in g.rollouts], [ray.put(t) for t in g.teacher], g.loss_weight,
                    g.rollout_id) for g in planned.groups]
    return PlannedStep(planned.index, groups, planned.max_new_tokens, planned.replayed, planned.stream_before)


def ray_name(recipe: Recipe, role: str, first_actor: str = "") -> str:
    """Name of an actor or placement group in Ray (dashboard, `ray list actors`): csd_ray/<run>/<role>.

    Names are scoped to the job's namespace, so two jobs running one recipe do not collide. Within
    a job an actor killed a moment ago may still hold its name (a rebuilt trainer group, a second
    run in one session): then ``#2``, ``#3``, ... is appended. ``first_actor``: the suffix of the
    first actor named after this (a trainer group's rank 0 is ``<name>-0``)."""
    base = f"csd_ray/{recipe.run.name}/{role}"
    for k in range(1, 1000):
        name = base if k == 1 else f"{base}#{k}"
        try:
            ray.get_actor(name + first_actor)
        except ValueError:  # not taken
            return name
    return f"{base}#{time.time_ns()}"


def _ping(actor, timeout: float) -> dict:
    """The actor's ready() answer, waiting out a restart in progress (calls fail meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get(actor.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def _shards(actors: list, n: int):
    per = -(-n // len(actors))
    for i, actor in enumerate(actors):
        lo, hi = i * per, min(n, (i + 1) * per)
        if lo < hi:
            yield actor, lo, hi


def _sampler_class(recipe: Recipe):
    if recipe.sampler.backend == "vllm":
        from csd_ray.workers.vllm_backend import VLLMSampler

        return VLLMSampler
    from csd_ray.workers.sampler import HFSampler

    return HFSampler


def _teacher_class(recipe: Recipe):
    if recipe.teacher.backend == "vllm":
        from csd_ray.workers.vllm_backend import VLLMTeacher

        return VLLMTeacher
    from csd_ray.workers.teacher import HFTeacher

    return HFTeacher
