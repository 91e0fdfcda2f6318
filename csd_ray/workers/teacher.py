"""Teacher actor: scores rollouts into a teacher-signal payload; can also sample (sequence KD)."""

from __future__ import annotations

import os
import time

import torch

from csd_ray.config import Recipe
from csd_ray.losses import topk_from_logits
from csd_ray.models import load_model, load_tokenizer
from csd_ray.rollout import Rollout, TeacherOutput, row_offsets
from csd_ray.workers.hf_generate import actor_info, configure_process, forward_hidden, hf_generate, response_logprobs


class HFTeacher:
    """Backend 'hf': one forward pass gives any payload (logits, top-k, hidden)."""

    def __init__(self, recipe: Recipe, replica: int = 0) -> None:
        configure_process(recipe.teacher.placement.torch_threads())
        self.recipe, self.replica = recipe, replica
        self.tokenizer = load_tokenizer(recipe.teacher_model)
        self.model = load_model(recipe.teacher_model, self.tokenizer)

    def ready(self) -> dict:
        return actor_info(replica=self.replica)

    def lm_head(self) -> torch.Tensor:
        """The teacher's output projection, held by trainers for the 'hidden' payload."""
        head = self.model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise NotImplementedError("teachers whose lm_head has a bias are not supported by the hidden payload yet")
        return head.weight.detach().clone()

    def score(self, rollout: Rollout) -> TeacherOutput:
        t0 = time.perf_counter()
        output = self._score(rollout)
        output.seconds, output.worker_pid = time.perf_counter() - t0, os.getpid()
        return output

    @torch.no_grad()
    def _score(self, rollout: Rollout) -> TeacherOutput:
        cfg = self.recipe.teacher
        target = rollout.target_mask()
        hidden = forward_hidden(self.model, rollout)[:, :-1][target]
        offsets = row_offsets(target)
        if cfg.payload == "hidden":
            return TeacherOutput("hidden", {"hidden": hidden.contiguous()}, offsets)
        logits = self.model.get_output_embeddings()(hidden)
        if cfg.payload == "logits":
            return TeacherOutput("logits", {"logits": logits.contiguous()}, offsets)
        extra = None
        if rollout.student_topk_ids is not None:
            extra = rollout.student_topk_ids[:, 1:][target]
        signal = topk_from_logits(logits, cfg.topk, extra_ids=extra)
        return TeacherOutput("topk", {"ids": signal.ids, "logprobs": signal.logprobs}, offsets)

    def generate(self, prompts: list[list[int]], prompt_indices: list[int], max_new_tokens: int, seed: int,
                 greedy: bool = False, temperature: float = 1.0) -> Rollout:
        t0 = time.perf_counter()
        rollout = hf_generate(
            self.model, prompts, pad_id=self.tokenizer.pad_token_id, eos_id=self.tokenizer.eos_token_id,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, seed=seed, greedy=greedy,
        )
        rollout.prompt_indices = list(prompt_indices)
        rollout.sampled_logprobs = None  # teacher log-probs are not the student's
        rollout.source = "teacher"
        rollout.seconds, rollout.worker_pid = time.perf_counter() - t0, os.getpid()
        return rollout

    def token_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """Log-prob of every response token under this model (evaluation NLLs)."""
        return response_logprobs(self.model, rollout)
