"""Real model families' quirks (issue 11): one generation contract and one logits contract, every backend.

Fixtures (tests/families.py): Qwen2-style (padded vocabulary, a sampling generation_config.json,
two eos ids), Llama-3-style (BOS, end-of-turn id only in the generation config) and
Gemma-2-style (final logit softcapping, <end_of_turn> in the eos list, BOS).
"""

import shutil

import pytest
import torch

from conftest import family_recipe, free_port
from csd_ray.data import encode_prompt
from csd_ray.generation import token_rules
from csd_ray.logits import output_logits
from csd_ray.models import load_tokenizer
from csd_ray.workers.hf_generate import forward_hidden
from families import FAMILIES

MAX_NEW = 16


def _prompts(tokenizer, n=16):
    return [encode_prompt(f"What is {i} + {3 * i}? Answer with the number.", tokenizer)[0] for i in range(n)]


def _responses(rollout):
    return [rollout.input_ids[b, rollout.response_mask[b]].tolist() for b in range(rollout.num_sequences)]


def trainer_logprobs(recipe, rollout) -> torch.Tensor:
    """Log-prob of each response token from a real trainer rank's forward pass (world size 1, gloo)."""
    from csd_ray.workers.trainer import TrainerRank

    rank = TrainerRank(recipe, 0, 1)
    rank.init_group("127.0.0.1", free_port())
    try:
        logits = rank.probe_logits(rollout)
    finally:
        rank.shutdown()
    vocab = len(rank.tokenizer)
    tokens = rollout.input_ids[:, 1:][rollout.target_mask()]
    out = torch.zeros(rollout.input_ids.shape)
    out[:, 1:][rollout.target_mask()] = torch.log_softmax(logits[:, :vocab].double(), -1).gather(1, tokens[:, None]).squeeze(1).float()
    return out


@pytest.fixture(scope="module")
def samplers(ray_session, family_folder, tmp_path_factory):
    """samplers(family, backend) -> (recipe, sampler actor), started once per module."""
    from csd_ray.workers.sampler import HFSampler

    started = {}

    def get(family, backend):
        if (family, backend) not in started:
            folder = family_folder(family)
            recipe = family_recipe(tmp_path_factory.mktemp(f"{family}-{backend}"), folder, folder,
                                   f"sampler.backend={backend}")
            if backend == "vllm":
                from csd_ray.workers.vllm_backend import VLLMSampler as cls
            else:
                cls = HFSampler
            actor = ray_session.remote(cls).options(num_cpus=0.25).remote(recipe)
            ray_session.get(actor.ready.remote())
            started[(family, backend)] = (recipe, actor)
        return started[(family, backend)]

    yield get
    for _, actor in started.values():
        ray_session.kill(actor)


@pytest.mark.parametrize("backend", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_logprobs_are_the_trainers_and_responses_stop_at_the_declared_ids(ray_session, samplers, family_folder,
                                                                                 family, backend):
    if backend == "vllm":
        pytest.importorskip("vllm")
    recipe, sampler = samplers(family, backend)
    tokenizer = load_tokenizer(recipe.student_model)
    rules = token_rules(tokenizer, str(family_folder(family)))
    assert len(rules.stop_ids) == 2 and rules.stop_ids[0] == tokenizer.eos_token_id
    rollout = ray_session.get(sampler.generate.remote(_prompts(tokenizer), list(range(16)), MAX_NEW, 5))

    responses = _responses(rollout)
    for r in responses:
        stops_at = [j for j, t in enumerate(r) if t in rules.stop_ids]
        assert stops_at in ([len(r) - 1], []), r  # a stop id only ever ends a response
        assert stops_at or len(r) == MAX_NEW, r
        assert max(r) < len(tokenizer)  # padded lm_head rows are never sampled
    ends = [r[-1] for r in responses]
    # The id only the generation config declares (end of turn) ends responses too, in every backend.
    assert rules.stop_ids[1] in ends, ends
    assert sum(e in rules.stop_ids for e in ends) >= 4

    expected = trainer_logprobs(recipe, rollout)
    mask = rollout.response_mask
    error = (rollout.sampled_logprobs[mask] - expected[mask]).abs().max()
    assert error < 2e-4, f"{family}/{backend}: sampled log-probs differ from the trainer's by {error}"


@pytest.mark.vllm
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_answers_are_the_same_in_both_backends(ray_session, samplers, family):
    pytest.importorskip("vllm")
    recipe, hf = samplers(family, "hf")
    _, vllm = samplers(family, "vllm")
    prompts = _prompts(load_tokenizer(recipe.student_model), 8)
    a, b = ray_session.get([s.generate.remote(prompts, list(range(8)), MAX_NEW, 0, True) for s in (hf, vllm)])
    assert _responses(a) == _responses(b)


def test_a_model_folders_generation_config_does_not_change_sampling(family_folder, tmp_path):
    """Qwen-style generation_config.json (repetition_penalty 1.05, top_k 20, top_p 0.8, T 0.7) is not applied."""
    from csd_ray.workers.sampler import HFSampler

    folder = family_folder("qwen2")
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "generation_config.json").unlink()
    samples = []
    for path in (folder, bare):
        sampler = HFSampler(family_recipe(tmp_path / path.name, path, path))
        prompts = _prompts(sampler.tokenizer, 8)
        samples.append(sampler.generate(prompts, list(range(8)), MAX_NEW, seed=9))
    with_config, without = samples
    # The stop ids differ (the bare folder declares only the tokenizer's eos), so compare up to the first stop.
    assert torch.equal(with_config.input_ids[:, :4], without.input_ids[:, :4])
    for r1, r2 in zip(_responses(with_config), _responses(without)):
        n = min(len(r1), len(r2))
        assert r1[:n] == r2[:n]


def test_evaluation_greedy_answers_ignore_the_folders_generation_config(family_folder, tmp_path):
    from csd_ray.workers.teacher import HFTeacher

    folder = family_folder("qwen2")
    teacher = HFTeacher(family_recipe(tmp_path, folder, folder))
    prompts = _prompts(teacher.tokenizer, 4)
    greedy = teacher.generate(prompts, list(range(4)), MAX_NEW, seed=0, greedy=True)
    # Greedy is argmax of the model's own logits at every step: no penalty or truncation moved it.
    target = greedy.target_mask()
    with torch.no_grad():
        logits = output_logits(teacher.model, forward_hidden(teacher.model, greedy)[:, :-1][target])
    chosen = greedy.input_ids[:, 1:][target]
    assert torch.equal(logits[:, : len(teacher.tokenizer)].argmax(-1), chosen)


# ---- the logits contract ---------------------------------------------------------------------

def _tiny(kind: str):
    from transformers import AutoModelForCausalLM, CohereConfig, GraniteConfig

    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)
    config = {"granite": lambda: GraniteConfig(logits_scaling=8.0, **common),
              "cohere": lambda: CohereConfig(logit_scale=0.0625, **common)}[kind]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("kind", ["granite", "cohere"])
def test_scaled_logits_families_are_reproduced(kind):
    from csd_ray.logits import logit_transform, verify_logits

    model = _tiny(kind)
    transform = logit_transform(model.config)
    assert transform.scale == pytest.approx(0.125 if kind == "granite" else 0.0625) and transform.softcap is None
    verify_logits(model, kind)  # our logits equal the model's forward


def test_gemma2_softcapping_is_reproduced_and_an_unknown_transform_is_caught(family_folder):
    from transformers import AutoModelForCausalLM

    from csd_ray.logits import LogitTransformError, logit_transform, verify_logits

    model = AutoModelForCausalLM.from_pretrained(family_folder("gemma2"), dtype=torch.float32)
    assert logit_transform(model.config).softcap == 30.0
    verify_logits(model, "gemma2")
    original = model.forward

    def forward(*args, **kwargs):  # a family whose forward rescales its logits, announced nowhere
        out = original(*args, **kwargs)
        out.logits = out.logits * 1.5
        return out

    model.forward = forward
    with pytest.raises(LogitTransformError, match="differ from its forward pass"):
        verify_logits(model, "odd model")


def test_a_family_with_an_unsupported_logit_transform_is_refused_before_any_actor(tmp_path, capsys):
    import json

    from csd_ray.run import main

    folder = tmp_path / "falcon"
    shutil.copytree(_llama_like_folder(tmp_path), folder)
    config = json.loads((folder / "config.json").read_text())
    config["lm_head_multiplier"] = 0.5
    (folder / "config.json").write_text(json.dumps(config))
    code = main(["recipes/smoke.yaml", f"student_model.path={folder}", f"teacher_model.path={folder}",
                 f"run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "student_model" in line and "lm_head_multiplier=0.5" in line
    assert not (tmp_path / "run" / "actors.json").exists()  # refused before any actor started


def _llama_like_folder(tmp_path):
    from csd_ray.config import ModelConfig
    from csd_ray.models import model_folder

    return model_folder(ModelConfig(path="tiny"))


@pytest.mark.parametrize("payload_dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_through_softcapping_matches_autograd(payload_dtype):
    from csd_ray.logits import LogitTransform
    from csd_ray.losses import HiddenTeacher, get_loss

    g = torch.Generator().manual_seed(0)
    n, d, v = 9, 16, 40
    h = (torch.randn(n, d, generator=g) * 3).requires_grad_(True)
    w = torch.randn(v, d, generator=g).requires_grad_(True)
    t_hidden, t_head = torch.randn(n, d, generator=g).to(payload_dtype), torch.randn(v, d, generator=g)
    cap = LogitTransform(scale=0.5, softcap=5.0)
    mask = torch.ones(n, dtype=torch.bool)
    for name, params in [("csd", {"weights": ["teacher", "student"]}), ("fkl", {}), ("rkl", {})]:
        loss = get_loss(name, **params)
        value, _ = loss.fused(h, w, HiddenTeacher(t_hidden, t_head, transform=cap), mask, student_transform=cap)
        gh, gw = torch.autograd.grad(value, [h, w])
        teacher_logits = cap(t_hidden.float() @ t_head.t())
        ref, _ = loss(cap(h @ w.t()), teacher_logits, mask)
        # the dense path's own closed-form gradient w.r.t. logits, chained through the transform by autograd
        rh, rw = torch.autograd.grad(ref, [h, w])
        assert torch.allclose(value, ref, rtol=1e-5), name
        assert torch.allclose(gh, rh, atol=1e-5) and torch.allclose(gw, rw, atol=1e-5), name


def test_eos_ids_declared_only_in_config_json_still_stop(family_folder, tmp_path):
    """A folder without generation_config.json: the model config's eos list is the declaration."""
    from transformers import AutoTokenizer

    bare = tmp_path / "llama3"
    shutil.copytree(family_folder("llama3"), bare)
    (bare / "generation_config.json").unlink()
    tok = AutoTokenizer.from_pretrained(bare)
    assert token_rules(tok, str(bare)).stop_ids == (tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>"))
