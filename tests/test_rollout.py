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
