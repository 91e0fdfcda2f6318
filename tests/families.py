"""Tiny random models with real families' configuration quirks, built on the fly (no download).

Each fixture is an HF folder (config, weights, tokenizer, generation_config.json) that the HF
and vLLM backends load like the real thing:

* ``qwen2``: Qwen2 architecture (attention biases), lm_head and embedding padded beyond the
  tokenizer (49152 + 128 rows, as Qwen's 151936 vs 151665), a generation_config.json that
  samples (repetition_penalty 1.05, top_k 20, top_p 0.8, temperature 0.7) and declares two eos
  ids (<|im_end|>, <|endoftext|>), bf16 weights, no BOS.
* ``llama3``: Llama architecture; the tokenizer adds a BOS (<|begin_of_text|>) that the chat
  template also writes; the end-of-turn id (<|eot_id|>) differs from the tokenizer's eos and is
  declared only in generation_config.json.
* ``gemma2``: Gemma-2 architecture with final_logit_softcapping 30 (and attention softcapping),
  <end_of_turn> in the eos list, BOS added by the tokenizer and written by the template, tied
  embeddings.

The tokenizer is SmolLM2's (offline) plus each family's special tokens. Random models almost
never emit one particular id, so the builder raises the stop ids' logits (one shared residual
direction, see ``_favour``) until responses of ~16 tokens often end early.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

STOP_PROBABILITY = 0.12  # per generated token, all stop ids together: responses of 16 often end early


def _base_tokenizer():
    from transformers import AutoTokenizer

    from csd_ray.models import resolve

    return AutoTokenizer.from_pretrained(resolve("smollm2-135m-instruct", need_model=False))


def _adds_bos(tokenizer, bos: str) -> None:
    """Make the tokenizer put ``bos`` before every text, as Llama and Gemma tokenizers do."""
    from tokenizers import processors

    bos_id = tokenizer.convert_tokens_to_ids(bos)
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    tokenizer.bos_token = bos


def _favour(model, stop_ids: list[int], probability: float, calibration: tuple[torch.Tensor, int]) -> None:
    """Make the stop ids together about ``probability`` likely at every position.

    Every input embedding gets a large constant in dimension 0, so the final normed hidden state
    has a large positive dimension 0 at every position; the stop ids' output rows read it, scaled
    (a few Newton-like rounds, softcapping included) until the mean stop probability over the
    calibration sequences ``ids`` [B, T] from column ``start`` on (where responses are sampled) is right."""
    ids, start = calibration
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = emb.data_ptr() == head.data_ptr()
    with torch.no_grad():
        emb[:, 0] = 1.0
        if not tied:
            head[:, 0] = 0.0
        level = float(model.get_decoder()(input_ids=ids).last_hidden_state[..., 0].mean())
        target = math.log(probability)
        for _ in range(6):
            log_probs = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
            now = float(torch.logsumexp(log_probs[:, start:, stop_ids], -1).exp().mean().log())
            head[stop_ids, 0] += (target - now) / level


def _calibration_ids(tok) -> torch.Tensor:
    """Chat prompts followed by random tokens: the contexts the fixtures are sampled in."""
    from csd_ray.data import encode_prompt

    rows = [encode_prompt(f"What is {i} + {2 * i}? Answer with the number.", tok)[0] for i in range(4)]
    width = max(map(len, rows))
    noise = torch.randint(3, 40000, (4, 12), generator=torch.Generator().manual_seed(0))
    return torch.cat([torch.tensor([[r[0]] * (width - len(r)) + r for r in rows]), noise], 1), width - 1


FAMILIES = ("qwen2", "llama3", "gemma2")


def build(family: str, out: Path, seed: int = 0, num_layers: int = 2) -> Path:
    """Write the ``family`` fixture (see module doc) into ``out``; return ``out``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    tok = _base_tokenizer()
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=64, max_position_embeddings=1024)
    if family == "qwen2":
        from transformers import Qwen2Config

        endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
        tok.pad_token = "<|endoftext|>"
        stops = [tok.eos_token_id, endoftext]
        config = Qwen2Config(vocab_size=len(tok) + 128, tie_word_embeddings=False, bos_token_id=None,
                             eos_token_id=tok.eos_token_id, pad_token_id=endoftext, **common)
        generation = GenerationConfig(do_sample=True, repetition_penalty=1.05, top_k=20, top_p=0.8, temperature=0.7,
                                      eos_token_id=stops, pad_token_id=endoftext)
        dtype = torch.bfloat16
    elif family == "llama3":
        from transformers import LlamaConfig

        tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|eot_id|>"]})
        _adds_bos(tok, "<|begin_of_text|>")
        tok.eos_token = "<|endoftext|>"  # Llama-3's tokenizer eos is <|end_of_text|>, not the turn end
        tok.pad_token = "<|endoftext|>"
        eot = tok.convert_tokens_to_ids("<|eot_id|>")
        tok.chat_template = (
            "{{ bos_token }}{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}")
        stops = [tok.eos_token_id, eot]
        config = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                             eos_token_id=stops, pad_token_id=tok.pad_token_id, **common)
        generation = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=stops, do_sample=True,
                                      temperature=0.6, top_p=0.9)
        dtype = torch.float32
    elif family == "gemma2":
        from transformers import Gemma2Config

        tok.add_special_tokens({"additional_special_tokens": ["<bos>", "<start_of_turn>", "<end_of_turn>"]})
        _adds_bos(tok, "<bos>")
        tok.eos_token = "<|endoftext|>"
        tok.pad_token = "<|endoftext|>"
        end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
        tok.chat_template = (
            "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else "
            "m['role']) + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
        stops = [tok.eos_token_id, end_of_turn]
        config = Gemma2Config(vocab_size=len(tok), tie_word_embeddings=True, final_logit_softcapping=30.0,
                              attn_logit_softcapping=50.0, query_pre_attn_scalar=64, sliding_window=512,
                              bos_token_id=tok.bos_token_id, eos_token_id=stops, pad_token_id=tok.pad_token_id, **common)
        generation = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        dtype = torch.float32
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.08)
    _favour(model, stops, STOP_PROBABILITY, _calibration_ids(tok))
    model.generation_config = generation
    model.to(dtype).save_pretrained(out)
    tok.save_pretrained(out)
    return out
