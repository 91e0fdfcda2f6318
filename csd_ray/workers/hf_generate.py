"""Sampling with transformers' generate(): shared by the student sampler and the teacher."""

from __future__ import annotations

import os
from typing import Optional

import torch

from csd_ray.models import position_ids
from csd_ray.rollout import Rollout


def configure_process(threads: int) -> None:
    """Set torch threads of an actor process (Ray does not)."""
    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def actor_info(**extra) -> dict:
    """pid and Ray node of the calling actor (actors.json; restarts show as new pids)."""
    import ray

    context = ray.get_runtime_context()
    return {"pid": os.getpid(), "node_id": context.get_node_id(), "name": context.get_actor_name(), **extra}


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def response_mask_after(sequences: torch.Tensor, prompt_width: int, eos_id: int) -> torch.Tensor:
    """True on generated tokens up to and including the first EOS."""
    generated = sequences[:, prompt_width:]
    is_eos = generated == eos_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    mask = torch.zeros_like(sequences, dtype=torch.bool)
    mask[:, prompt_width:] = ~after_eos
    return mask


@torch.no_grad()
def hf_generate(
    model,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    student_topk: int = 0,
    greedy: bool = False,
) -> Rollout:
    """Sample one response per prompt; log-probs are the model's own (temperature 1)."""
    ids, mask = left_pad(prompts, pad_id)
    generator_seed = torch.random.initial_seed()
    torch.manual_seed(seed)
    try:
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_p=None if greedy else top_p,
            top_k=None if greedy else 0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
    finally:
        torch.manual_seed(generator_seed)
    sequences = out.sequences
    width = ids.shape[1]
    resp = response_mask_after(sequences, width, eos_id)
    attn = torch.cat([mask, resp[:, width:].long()], dim=1)
    logits = torch.stack(out.logits, dim=1).float()  # [B, R, V], raw (before temperature)
    log_probs = torch.log_softmax(logits, dim=-1)
    generated = sequences[:, width:]
    sampled = torch.zeros(sequences.shape, dtype=torch.float32)
    sampled[:, width:] = log_probs.gather(-1, generated[:, :, None]).squeeze(-1)
    sampled = sampled.masked_fill(~resp, 0.0)
    topk_ids: Optional[torch.Tensor] = None
    if student_topk:
        # Position j-1 predicts token j: store the top-k of the distribution that produced token j at column j.
        topk_ids = torch.full((*sequences.shape, student_topk), -1, dtype=torch.long)
        topk_ids[:, width:] = logits.topk(student_topk, dim=-1).indices
    return Rollout(sequences, attn, resp, sampled, topk_ids)


def forward_hidden(model, rollout: Rollout) -> torch.Tensor:
    """Final (normed) hidden states ``[B, T, d]`` of a rollout, with generate()'s positions."""
    decoder = model.get_decoder()
    out = decoder(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=position_ids(rollout.attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


@torch.no_grad()
def response_logprobs(model, rollout: Rollout) -> torch.Tensor:
    """Log-prob under ``model`` of every response token of a rollout, ``[B, T]`` (0 elsewhere)."""
    hidden = forward_hidden(model, rollout)[:, :-1][rollout.target_mask()]
    logits = model.get_output_embeddings()(hidden).float()
    tokens = rollout.input_ids[:, 1:][rollout.target_mask()]
    out = torch.zeros(rollout.input_ids.shape)
    out[:, 1:][rollout.target_mask()] = torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1)
    return out
