"""Teacher actor: scores rollouts into a teacher-signal payload; can also sample (sequence KD)."""

from __future__ import annotations

import os
import time

import torch

from csd_ray.config import Recipe
from csd_ray.generation import SamplingSpec
from csd_ray.logits import logit_transform, output_logits
from csd_ray.losses import topk_from_logits
from csd_ray.rollout import Rollout, TeacherOutput, row_offsets, topk_extra_ids
from csd_ray.workers.hf_generate import actor_info, configure_process, forward_hidden, hf_generate, load_role_model, response_logprobs


class HFTeacher:
    """Backend 'hf': one forward pass gives any payload (logits, top-k, hidden), on the role's device."""

    def __init__(self, recipe: Recipe, replica: int = 0) -> None:
        configure_process(recipe.teacher.placement.torch_threads())
        self.recipe, self.replica = recipe, replica
        self.tokenizer, self.model, self.rules = load_role_model(
            recipe.teacher_model, recipe.teacher.placement.num_gpus, "teacher")

    def ready(self) -> dict:
        return actor_info(replica=self.replica, device=str(self.model.device))

    def lm_head(self) -> tuple[torch.Tensor, dict]:
        """The teacher's output projection (CPU) and its logit transform, held by trainers for the 'hidden' payload."""
        head = self.model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise NotImplementedError("teachers whose lm_head has a bias are not supported by the hidden payload yet")
        transform = logit_transform(self.model.config)
        return head.weight.detach().cpu().clone(), {"scale": transform.scale, "softcap": transform.softcap}

    def score(self, rollout: Rollout) -> TeacherOutput:
        t0 = time.perf_counter()
        output = self._score(rollout)
        output.seconds, output.worker_pid = time.perf_counter() - t0, os.getpid()
        return output

    @torch.no_grad()
    def _score(self, rollout: Rollout) -> TeacherOutput:
        cfg = self.recipe.teacher
        target = rollout.target_mask()
        hidden = forward_hidden(self.model, rollout)[:, :-1][target.to(self.model.device)]
        offsets = row_offsets(target)
        if cfg.payload == "hidden":  # shipped in the teacher's dtype; the trainer upcasts per chunk
            return TeacherOutput("hidden", {"hidden": hidden.contiguous().cpu()}, offsets)
        logits = output_logits(self.model, hidden)
        if cfg.payload == "logits":
            return TeacherOutput("logits", {"logits": logits.contiguous().cpu()}, offsets)
        extra = topk_extra_ids(rollout).to(logits.device)
        step = max(1, (1 << 23) // logits.shape[1])  # fp32 log-softmax per chunk of rows, never [N, V] at once
        parts = [topk_from_logits(logits[lo : lo + step, : self.rules.vocab_size], cfg.topk, extra_ids=extra[lo : lo + step])
                 for lo in range(0, max(1, logits.shape[0]), step)]
        return TeacherOutput("topk", {"ids": torch.cat([p.ids for p in parts]).cpu(),
                                      "logprobs": torch.cat([p.logprobs for p in parts]).cpu()}, offsets)

    def generate(self, prompts: list[list[int]], prompt_indices: list[int], max_new_tokens: int, seed: int,
                 greedy: bool = False, temperature: float = 1.0) -> Rollout:
        t0 = time.perf_counter()
        spec = SamplingSpec(max_new_tokens, temperature, 1.0, 0, greedy, seed)
        rollout = hf_generate(self.model, prompts, spec, self.rules, record_logprobs=False)  # not the student's
        rollout.prompt_indices = list(prompt_indices)
        rollout.source = "teacher"
        rollout.seconds, rollout.worker_pid = time.perf_counter() - t0, os.getpid()
        return rollout

    def token_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """Log-prob of every response token under this model (evaluation NLLs)."""
        return response_logprobs(self.model, rollout, self.rules.vocab_size)
