"""Sampling with transformers' generate(): shared by the student sampler and the teacher."""

from __future__ import annotations

import os
from typing import Optional

import torch

from csd_ray.generation import SamplingSpec, TokenRules, hf_generate_kwargs, response_mask_after
from csd_ray.logits import output_logits
from csd_ray.models import position_ids
from csd_ray.rollout import Rollout


def configure_process(threads: int) -> None:
    """Set torch threads of an actor process (Ray does not)."""
    torch.set_num_threads(max(1, threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def actor_info(**extra) -> dict:
    """pid, Ray node and torch intra-op threads of the calling actor (actors.json; restarts show
    as new pids; threads show whether roles sharing cores got the count their placement asked for)."""
    import ray

    context = ray.get_runtime_context()
    return {"pid": os.getpid(), "node_id": context.get_node_id(), "name": context.get_actor_name(),
            "threads": torch.get_num_threads(), **extra}


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def hf_generate(model, prompts: list[list[int]], spec: SamplingSpec, rules: TokenRules, student_topk: int = 0,
                record_logprobs: bool = True) -> Rollout:
    """One response per prompt under the generation contract (csd_ray.generation).

    Recorded log-probs are those of the distribution sampled from (generate()'s processed
    scores: temperature, truncation, real vocabulary), so at temperature 1 without truncation
    they are the model's own. ``record_logprobs=False`` (teacher samples, greedy answers) keeps
    no per-step scores at all."""
    device = model.device
    ids, mask = left_pad(prompts, rules.pad_id)
    ids, mask = ids.to(device), mask.to(device)
    generator_seed = torch.random.initial_seed()
    torch.manual_seed(spec.seed)
    try:
        out = model.generate(input_ids=ids, attention_mask=mask,
                             **hf_generate_kwargs(spec, rules, output_scores=record_logprobs or bool(student_topk)))
    finally:
        torch.manual_seed(generator_seed)
    sequences = out.sequences.cpu()
    width = ids.shape[1]
    resp = response_mask_after(sequences, width, rules)
    attn = torch.cat([mask.cpu(), resp[:, width:].long()], dim=1)
    if out.scores is None:
        return Rollout(sequences, attn, resp)
    generated = out.sequences[:, width:]
    sampled = torch.zeros(sequences.shape, dtype=torch.float32)
    topk_ids: Optional[torch.Tensor] = None
    if student_topk:
        topk_ids = torch.full((*sequences.shape, student_topk), -1, dtype=torch.long)
    for j, step_scores in enumerate(out.scores):  # one [B, V] step at a time, never [B, R, V] in fp32
        log_probs = torch.log_softmax(step_scores.float(), dim=-1)
        sampled[:, width + j] = log_probs.gather(-1, generated[:, j, None]).squeeze(-1).cpu()
        if topk_ids is not None:
            # Position j-1 predicts token j: the top-k of the distribution that produced token j, at column j.
            topk_ids[:, width + j] = step_scores.topk(student_topk, dim=-1).indices.cpu()
    return Rollout(sequences, attn, resp, sampled.masked_fill(~resp, 0.0), topk_ids)


def forward_hidden(model, rollout: Rollout) -> torch.Tensor:
    """Final (normed) hidden states ``[B, T, d]`` of a rollout, with generate()'s positions."""
    decoder = model.get_decoder()
    device = model.device
    out = decoder(
        input_ids=rollout.input_ids.to(device),
        attention_mask=rollout.attention_mask.to(device),
        position_ids=position_ids(rollout.attention_mask).to(device),
        use_cache=False,
    )
    return out.last_hidden_state


@torch.no_grad()
def response_logprobs(model, rollout: Rollout, vocab_size: int) -> torch.Tensor:
    """Log-prob under ``model`` of every response token of a rollout, ``[B, T]`` (0 elsewhere).

    Normalised over the real vocabulary (``vocab_size`` = len(tokenizer)), like sampling."""
    target = rollout.target_mask()
    hidden = forward_hidden(model, rollout)[:, :-1][target.to(model.device)]
    tokens = rollout.input_ids[:, 1:][target].to(hidden.device)
    values = torch.empty(tokens.shape[0], dtype=torch.float32)
    step = max(1, (1 << 23) // vocab_size)  # rows per chunk: [rows x V] logits stay ~32 MB
    for lo in range(0, tokens.shape[0], step):
        logits = output_logits(model, hidden[lo : lo + step]).float()[:, :vocab_size]
        values[lo : lo + step] = torch.log_softmax(logits, -1).gather(1, tokens[lo : lo + step, None]).squeeze(1).cpu()
    out = torch.zeros(rollout.input_ids.shape)
    out[:, 1:][target] = values
    return out


def load_role_model(model_cfg, num_gpus: float, role: str):
    """(tokenizer, model, token rules) of an HF-backend role, on the role's device.

    The model's own generation config is replaced by a neutral one (generation contract), and
    its logits are checked against the logits contract once."""
    from csd_ray.devices import role_device
    from csd_ray.generation import adopt
    from csd_ray.logits import verify_logits
    from csd_ray.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, tokenizer).to(role_device(num_gpus, role))
    verify_logits(model, f"{role} model '{model_cfg.path}'")
    return tokenizer, model, adopt(model, tokenizer)
