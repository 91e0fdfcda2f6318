"""Student sampler actor: generates rollouts with the latest weights it was sent."""

from __future__ import annotations

import os
import time

import torch

from csd_ray.config import Recipe
from csd_ray.generation import SamplingSpec
from csd_ray.logits import output_logits
from csd_ray.rollout import Rollout
from csd_ray.weight_sync import HostWeights
from csd_ray.workers.hf_generate import (actor_info, configure_process, forward_hidden, hf_generate, load_role_model,
                                         response_logprobs)


class HFSampler:
    """Backend 'hf': transformers generate() on a private copy of the student, on the role's device."""

    def __init__(self, recipe: Recipe, replica: int = 0) -> None:
        configure_process(recipe.sampler.placement.torch_threads())
        self.recipe, self.replica = recipe, replica
        self.tokenizer, self.model, self.rules = load_role_model(
            recipe.student_model, recipe.sampler.placement.num_gpus, "sampler")
        self.version = 0

    def ready(self) -> dict:
        return actor_info(replica=self.replica, device=str(self.model.device))

    def generate(self, prompts: list[list[int]], prompt_indices: list[int], max_new_tokens: int, seed: int,
                 greedy: bool = False) -> Rollout:
        cfg = self.recipe.sampler
        t0 = time.perf_counter()
        spec = SamplingSpec(max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, greedy, seed)
        rollout = hf_generate(self.model, prompts, spec, self.rules, student_topk=0 if greedy else cfg.student_topk,
                              record_logprobs=not greedy)  # greedy answers (evaluation) need no log-probs
        rollout.weight_version = self.version
        rollout.prompt_indices = list(prompt_indices)
        rollout.seconds, rollout.worker_pid = time.perf_counter() - t0, os.getpid()
        return rollout

    def receive_weights(self, weights: HostWeights, version: int) -> int:
        """Load a full (HF-named) state dict sent through the object store (cast to this model's dtype)."""
        missing, unexpected = self.model.load_state_dict(weights.to_state_dict(), strict=False)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"weight sync mismatch: missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")
        self.version = version
        return version

    @torch.no_grad()
    def probe_logits(self, rollout: Rollout) -> torch.Tensor:
        """Student logits at the loss rows of a rollout (tests: compare with the trainer)."""
        hidden = forward_hidden(self.model, rollout)[:, :-1][rollout.target_mask().to(self.model.device)]
        return output_logits(self.model, hidden).float().cpu()

    def token_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """Log-prob of every response token under this model (evaluation NLLs)."""
        return response_logprobs(self.model, rollout, self.rules.vocab_size)
