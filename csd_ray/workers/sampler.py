"""Student sampler actor: generates rollouts with the latest weights it was sent."""

from __future__ import annotations

import os
import time

import torch

from csd_ray.config import Recipe
from csd_ray.models import load_model, load_tokenizer
from csd_ray.rollout import Rollout
from csd_ray.weight_sync import HostWeights
from csd_ray.workers.hf_generate import actor_info, configure_process, forward_hidden, hf_generate, response_logprobs


class HFSampler:
    """Backend 'hf': transformers generate() on a private copy of the student."""

    def __init__(self, recipe: Recipe, replica: int = 0) -> None:
        configure_process(recipe.sampler.placement.torch_threads())
        self.recipe, self.replica = recipe, replica
        self.tokenizer = load_tokenizer(recipe.student_model)
        self.model = load_model(recipe.student_model, self.tokenizer)
        self.version = 0

    def ready(self) -> dict:
        return actor_info(replica=self.replica)

    def generate(self, prompts: list[list[int]], prompt_indices: list[int], max_new_tokens: int, seed: int,
                 greedy: bool = False) -> Rollout:
        cfg = self.recipe.sampler
        t0 = time.perf_counter()
        rollout = hf_generate(
            self.model, prompts, pad_id=self.tokenizer.pad_token_id, eos_id=self.tokenizer.eos_token_id,
            max_new_tokens=max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            seed=seed, student_topk=cfg.student_topk, greedy=greedy,
        )
        rollout.weight_version = self.version
        rollout.prompt_indices = list(prompt_indices)
        rollout.seconds, rollout.worker_pid = time.perf_counter() - t0, os.getpid()
        return rollout

    def receive_weights(self, weights: HostWeights, version: int) -> int:
        """Load a full (HF-named) state dict sent through the object store."""
        missing, unexpected = self.model.load_state_dict(weights.to_state_dict(), strict=False)
        tied = {"lm_head.weight"} if self.model.config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"weight sync mismatch: missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")
        self.version = version
        return version

    @torch.no_grad()
    def probe_logits(self, rollout: Rollout) -> torch.Tensor:
        """Student logits at the loss rows of a rollout (tests: compare with the trainer)."""
        hidden = forward_hidden(self.model, rollout)[:, :-1][rollout.target_mask()]
        return self.model.get_output_embeddings()(hidden).float()

    def token_logprobs(self, rollout: Rollout) -> torch.Tensor:
        """Log-prob of every response token under this model (evaluation NLLs)."""
        return response_logprobs(self.model, rollout)
