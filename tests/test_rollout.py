"""Joining shards from several sampler/teacher replicas keeps every token and loss row in order."""

import torch

from csd_ray.rollout import TeacherOutput, concat_rollouts, rollout_from_tokens, row_offsets
from csd_ray.workers.trainer import concat_teacher_outputs


def _shard(prompts, responses, version):
    r = rollout_from_tokens(prompts, responses, pad_id=0, weight_version=version, prompt_indices=list(range(len(prompts))))
    r.sampled_logprobs = torch.where(r.response_mask, -r.input_ids.float(), torch.zeros(()))
    return r


def test_concat_rollouts_and_teacher_outputs_line_up():
    a = _shard([[5, 6, 7], [8]], [[11, 12], [13, 14, 15]], version=3)
    b = _shard([[9, 9, 9, 9, 9]], [[21]], version=2)  # wider prompt, shorter response
    joined = concat_rollouts([a, b])
    assert joined.num_sequences == 3 and joined.weight_version == 2
    responses = [joined.input_ids[i, joined.response_mask[i]].tolist() for i in range(3)]
    assert responses == [[11, 12], [13, 14, 15], [21]]
    prompts = [joined.input_ids[i, joined.attention_mask[i].bool() & ~joined.response_mask[i]].tolist() for i in range(3)]
    assert prompts == [[5, 6, 7], [8], [9, 9, 9, 9, 9]]
    assert torch.equal(joined.sampled_logprobs[joined.response_mask], -torch.tensor([11., 12, 13, 14, 15, 21]))

    def scored(r, width):  # one row per loss row, tagged with the token it predicts
        tokens = r.input_ids[:, 1:][r.target_mask()]
        ids = tokens[:, None].repeat(1, width)
        return TeacherOutput("topk", {"ids": ids, "logprobs": torch.zeros(ids.shape)}, row_offsets(r.target_mask()))

    teacher = concat_teacher_outputs([scored(a, 3), scored(b, 2)])  # top-k widths differ between shards
    assert teacher.rows["ids"].shape == (6, 3) and torch.isinf(teacher.rows["logprobs"][5, 2])
    assert torch.equal(teacher.rows["ids"][:, 0], joined.input_ids[:, 1:][joined.target_mask()])
    assert teacher.offsets.tolist() == [0, 2, 5, 6]
    second = teacher.select(1, 3)
    assert second.rows["ids"][:, 0].tolist() == [13, 14, 15, 21] and second.offsets.tolist() == [0, 3, 4]


def test_hf_sampler_puts_every_generated_token_in_the_loss_mask(tmp_path):
    """The first generated token is a response token too, and its log-prob is the model's own."""
    from conftest import smoke_recipe
    from csd_ray.workers.sampler import HFSampler

    sampler = HFSampler(smoke_recipe(tmp_path))
    eos = sampler.tokenizer.eos_token_id
    prompts = [[1, 42, 7, 99], [5, 6], [8, 9, 10]]
    width = max(map(len, prompts))
    for seed in range(2):
        rollout = sampler.generate(prompts, [0, 1, 2], max_new_tokens=6, seed=seed)
        generated = rollout.input_ids[:, width:]
        for b in range(len(prompts)):
            row = generated[b].tolist()
            until = row.index(eos) + 1 if eos in row else len(row)
            expected = torch.zeros(rollout.input_ids.shape[1], dtype=torch.bool)
            expected[width : width + until] = True
            assert torch.equal(rollout.response_mask[b], expected), (b, row)
            assert torch.equal(rollout.attention_mask[b, width:].bool(), expected[width:])
        own = sampler.token_logprobs(rollout)
        assert (rollout.sampled_logprobs[rollout.response_mask] < 0).all()
        assert torch.allclose(rollout.sampled_logprobs, own, atol=1e-4)


def test_response_mask_ends_at_the_first_eos_inclusive():
    from csd_ray.workers.hf_generate import response_mask_after

    eos = 0
    sequences = torch.tensor([[9, 9, 5, 0, 6, 0], [9, 9, 0, 7, 0, 8], [9, 9, 5, 6, 7, 8]])
    mask = response_mask_after(sequences, prompt_width=2, eos_id=eos)
    assert mask.tolist() == [[False, False, True, True, False, False],
                             [False, False, True, False, False, False],
                             [False, False, True, True, True, True]]
