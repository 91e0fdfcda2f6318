"""The generation contract: the one set of rules every backend and role samples by.

The HF sampler, the vLLM sampler, teacher samples (sequence KD) and evaluation's greedy answers
all call this module instead of repeating the rules, so a new family's quirk is one change here:

* **The recipe alone sets the distribution.** Sampling is softmax(z / temperature), cut by
  top_p and top_k when the recipe asks, over the tokenizer's real vocabulary (rows an lm_head
  is padded with, e.g. Qwen's 151936 vs 151665, are never sampled). Nothing a model folder ships
  in ``generation_config.json`` (repetition_penalty, min_p, no_repeat_ngram_size, its own
  temperature/top_k/top_p, ...) changes it: HF models get a neutral generation config, vLLM
  engines are started with ``generation_config="vllm"``.
* **Recorded log-probs are those of the distribution actually sampled** (after temperature and
  truncation; with the defaults temperature 1 and no truncation they are the model's own
  log-probs, which is what the trainer computes in its forward pass).
* **Stop ids** are the tokenizer's eos plus every eos id the model's generation config declares
  (Llama-3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``, Qwen's ``<|im_end|>``). The same set ends
  sampled responses, response masks, ``eos_rate``; dataset reference responses end with the id
  the chat template closes an assistant turn with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class SamplingSpec:
    """How one batch of responses is drawn (identical meaning in every backend)."""

    max_new_tokens: int
    """Response length cap in tokens."""
    temperature: float = 1.0
    """Softmax temperature (> 0); ignored when greedy."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]; 1 = no truncation."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = no truncation."""
    greedy: bool = False
    """Argmax decoding (evaluation)."""
    seed: int = 0
    """Seed of the draw (per batch; backends derive per-sequence seeds from it)."""


@dataclass(frozen=True)
class TokenRules:
    """What a model's tokenizer and generation config say about token ids."""

    stop_ids: tuple[int, ...]
    """Ids that end a response: tokenizer eos first, then the generation config's eos ids."""
    pad_id: int
    """Id used for padding (never part of a response)."""
    vocab_size: int
    """Real vocabulary size (len(tokenizer)); ids at or beyond it are never sampled."""
    end_of_response_id: int
    """Id appended to dataset reference responses (what closes an assistant turn)."""

    def is_stop(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor of ``ids``' shape: True where the id is a stop id."""
        return torch.isin(ids, torch.tensor(self.stop_ids, dtype=ids.dtype, device=ids.device))


def declared_eos_ids(source: Optional[str]) -> list[int]:
    """eos ids a model declares (``generation_config.json``, else ``config.json``), [] if none.

    ``source``: an HF folder or a hub id (read through the hub cache)."""
    if not source:
        return []
    from transformers import AutoConfig, GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(source).eos_token_id
    except (OSError, ValueError):  # no generation_config.json: the model config's own
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError):
            return []
        eos = getattr(getattr(config, "text_config", None) or config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def token_rules(tokenizer, model_folder: Optional[str] = None, extra_eos: Sequence[int] = ()) -> TokenRules:
    """The stop ids, pad id, real vocabulary and end-of-response id of a model.

    ``model_folder`` is an HF folder or hub id whose generation config may declare more eos ids;
    ``extra_eos`` adds ids known otherwise (a model object's generation config)."""
    stops: list[int] = []
    for i in [tokenizer.eos_token_id, *declared_eos_ids(model_folder), *extra_eos]:
        if i is not None and int(i) not in stops:
            stops.append(int(i))
    if not stops:
        raise ValueError("the tokenizer has no eos token and the model declares none: responses could never end")
    return TokenRules(tuple(stops), int(tokenizer.pad_token_id), len(tokenizer), _end_of_turn_id(tokenizer, stops))


def _end_of_turn_id(tokenizer, stops: list[int]) -> int:
    """The stop id the chat template writes right after an assistant message (else the eos)."""
    if getattr(tokenizer, "chat_template", None):
        marker = "csd ray end marker"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
        except Exception:  # templates that refuse this shape: fall back to the eos
            return stops[0]
        tail = tokenizer(text[text.rfind(marker) + len(marker):], add_special_tokens=False)["input_ids"]
        for token in tail:
            if token in stops:
                return token
    return stops[0]


def adopt(model, tokenizer) -> TokenRules:
    """The token rules of an HF model, whose own generation config is then made neutral.

    The eos ids it declared are kept in the rules; everything else it declared (penalties,
    truncation, temperature) stops acting."""
    declared = getattr(model.generation_config, "eos_token_id", None) if model.generation_config else None
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    rules = token_rules(tokenizer, extra_eos=declared)
    model.generation_config = neutral_generation_config(rules)
    return rules


def neutral_generation_config(rules: TokenRules):
    """A GenerationConfig that changes nothing about the distribution (replaces a model's own)."""
    from transformers import GenerationConfig

    return GenerationConfig(eos_token_id=list(rules.stop_ids), pad_token_id=rules.pad_id)


def hf_generate_kwargs(spec: SamplingSpec, rules: TokenRules, output_scores: bool = False) -> dict:
    """Arguments of transformers' ``generate`` that implement ``spec``.

    transformers fills every argument left None from ``model.generation_config``, so each
    distribution-changing field is set to its neutral value explicitly, and callers also replace
    the model's generation config (``neutral_generation_config``)."""
    from transformers import LogitsProcessorList

    config = neutral_generation_config(rules)
    config.update(do_sample=not spec.greedy, max_new_tokens=spec.max_new_tokens, repetition_penalty=1.0,
                  no_repeat_ngram_size=0, renormalize_logits=False, return_dict_in_generate=True,
                  output_scores=output_scores)
    if not spec.greedy:  # (greedy decoding applies no warper; setting them only draws warnings)
        config.update(temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k, min_p=None, typical_p=1.0,
                      epsilon_cutoff=0.0, eta_cutoff=0.0)
    return {"generation_config": config, "logits_processor": LogitsProcessorList([_RealVocabulary(rules.vocab_size)])}


class _RealVocabulary:
    """Logits processor: ids beyond the real vocabulary (padded lm_head rows) are never sampled."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] > self.vocab_size:
            scores = scores.clone()
            scores[:, self.vocab_size:] = float("-inf")
        return scores


def vllm_sampling_params(spec: SamplingSpec, rules: TokenRules, model_vocab: int, n_prompts: int,
                         logprobs: int = 1) -> list:
    """vLLM ``SamplingParams`` implementing ``spec``, one per prompt (seeded ``spec.seed + i``).

    The engine must be built with ``vllm_engine_kwargs`` (no folder generation config,
    processed log-probs) for the recorded log-probs to be those of this distribution."""
    from vllm import SamplingParams

    # Padded lm_head rows get the lowest bias vLLM allows (-100: exp(-100) is 0 in fp32), as a
    # short dict: an allowed_token_ids list of the whole real vocabulary costs 152k ids per request.
    banned = {i: -100.0 for i in range(rules.vocab_size, model_vocab)} or None
    return [
        SamplingParams(
            n=1, max_tokens=spec.max_new_tokens, temperature=0.0 if spec.greedy else spec.temperature,
            top_p=1.0 if spec.greedy else spec.top_p, top_k=0 if spec.greedy else spec.top_k,
            seed=spec.seed + i, logprobs=logprobs, stop_token_ids=list(rules.stop_ids), ignore_eos=False,
            repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0,
            logit_bias=banned,
        )
        for i in range(n_prompts)
    ]


def vllm_engine_kwargs(max_logprobs: int) -> dict:
    """Engine settings the contract needs: the folder's generation config ignored, log-probs of
    the distribution sampled, and room for the recipe's top-k (vLLM's default cap is 20)."""
    return {"generation_config": "vllm", "logprobs_mode": "processed_logprobs", "max_logprobs": max(20, max_logprobs)}


def cut_at_stop(tokens: list[int], rules: TokenRules) -> list[int]:
    """A response up to and including its first stop id."""
    stops = set(rules.stop_ids)
    for j, token in enumerate(tokens):
        if token in stops:
            return tokens[: j + 1]
    return tokens


def response_mask_after(sequences: torch.Tensor, prompt_width: int, rules: TokenRules) -> torch.Tensor:
    """[B, T] True on generated tokens up to and including the first stop id."""
    is_stop = rules.is_stop(sequences[:, prompt_width:]).long()
    after_stop = (is_stop.cumsum(1) - is_stop) > 0  # strictly after the first stop id
    mask = torch.zeros_like(sequences, dtype=torch.bool)
    mask[:, prompt_width:] = ~after_stop
    return mask
