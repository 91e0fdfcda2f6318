"""Joining shards from several sampler/teacher replicas keeps every token and loss row in order."""

import pytest
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


def test_response_mask_ends_at_the_first_stop_id_inclusive():
    from csd_ray.generation import TokenRules, response_mask_after

    rules = TokenRules(stop_ids=(0, 3), pad_id=0, vocab_size=100, end_of_response_id=3)
    sequences = torch.tensor([[9, 9, 5, 0, 6, 0], [9, 9, 0, 7, 0, 8], [9, 9, 5, 6, 7, 8], [9, 9, 3, 4, 0, 0]])
    mask = response_mask_after(sequences, 2, rules)
    assert mask.tolist() == [[False, False, True, True, False, False],
                             [False, False, True, False, False, False],
                             [False, False, True, True, True, True],
                             [False, False, True, False, False, False]]  # the second stop id ends it too


def test_rollout_from_tokens_layout_select_and_metadata():
    r = rollout_from_tokens([[5, 6, 7], [8]], [[11, 12], []], pad_id=0, weight_version=4, source="dataset",
                            prompt_indices=[10, 20], rollout_id=9, seconds=1.5, worker_pid=77)
    assert r.input_ids.tolist() == [[5, 6, 7, 11, 12], [0, 0, 8, 0, 0]]
    assert r.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 0, 0]]
    assert r.response_mask.tolist() == [[False, False, False, True, True], [False] * 5]
    assert r.target_mask().tolist() == [[False, False, True, True], [False] * 4]
    assert (r.num_sequences, r.num_tokens()) == (2, 2)
    second = r.select(1, 2)
    assert second.input_ids.tolist() == [[0, 0, 8, 0, 0]] and second.prompt_indices == [20]
    assert (second.weight_version, second.source, second.loss_weight, second.rollout_id, second.seconds,
            second.worker_pid) == (4, "dataset", 1.0, 9, 1.5, 77)
    assert second.sampled_logprobs is None and second.student_topk_ids is None
    empty = rollout_from_tokens([[1, 2]], [[]], pad_id=0)
    assert empty.input_ids.shape == (1, 3) and empty.num_tokens() == 0  # one column even with no response


def test_teacher_output_select_signal_and_size():
    from csd_ray.losses import DenseTeacher, HiddenTeacher, TopKTeacher

    offsets = row_offsets(torch.tensor([[True, True, False], [False, False, False], [True, True, True]]))
    assert offsets.tolist() == [0, 2, 2, 5]
    logits = torch.arange(5 * 4, dtype=torch.float32).reshape(5, 4)
    out = TeacherOutput("logits", {"logits": logits}, offsets, seconds=2.0, worker_pid=5)
    part = out.select(1, 3)
    assert part.rows["logits"].tolist() == logits[2:].tolist() and part.offsets.tolist() == [0, 0, 3]
    assert (part.payload, part.seconds, part.worker_pid) == ("logits", 2.0, 5)
    assert out.nbytes() == 5 * 4 * 4
    moved = out.to(torch.device("cpu"))
    assert torch.equal(moved.rows["logits"], logits) and (moved.seconds, moved.worker_pid) == (2.0, 5)
    assert isinstance(out.signal(), DenseTeacher)
    topk = TeacherOutput("topk", {"ids": torch.zeros(5, 2, dtype=torch.long), "logprobs": torch.zeros(5, 2)}, offsets)
    assert isinstance(topk.signal(), TopKTeacher) and topk.nbytes() == 5 * 2 * (8 + 4)
    hidden = TeacherOutput("hidden", {"hidden": torch.zeros(5, 3)}, offsets)
    head = torch.ones(4, 3)
    signal = hidden.signal(head)
    assert isinstance(signal, HiddenTeacher) and signal.lm_head is head
    with pytest.raises(AssertionError, match="needs the teacher's lm_head"):
        hidden.signal()


def test_concat_of_one_part_is_that_part_and_versions_take_the_oldest():
    a = _shard([[5, 6]], [[7]], version=3)
    assert concat_rollouts([a]) is a
    b = _shard([[1]], [[2, 3]], version=1)
    b.seconds, a.seconds = 4.0, 2.0
    joined = concat_rollouts([a, b])
    assert joined.weight_version == 1 and joined.seconds == 4.0 and joined.prompt_indices == [0, 0]


def test_each_trainer_rank_takes_its_own_equal_share_of_sequences_and_teacher_rows(tmp_path):
    from conftest import smoke_recipe
    from csd_ray.workers.trainer import TrainerRank

    threads = torch.get_num_threads()
    try:
        ranks = [TrainerRank(smoke_recipe(tmp_path), r, 2) for r in (0, 1)]
    finally:
        torch.set_num_threads(threads)  # the constructor sizes this process's threads like an actor's
    rollout = rollout_from_tokens([[1], [2], [3], [4], [5]], [[11, 12], [13], [14, 15, 16], [17], [18]], pad_id=0,
                                  prompt_indices=[0, 1, 2, 3, 4])
    teacher = TeacherOutput("logits", {"logits": torch.arange(8.0)[:, None]}, row_offsets(rollout.target_mask()))
    assert ranks[0].version == 0 and ranks[0].teacher_lm_head is None  # a fresh rank: no step, no teacher head yet
    shares = [rank._my_share(rollout, teacher) for rank in ranks]
    assert [s.prompt_indices for s, _ in shares] == [[0, 1], [2, 3]]  # 5 // 2 each (recipes must divide evenly: config check)
    assert [t.rows["logits"].squeeze(1).tolist() for _, t in shares] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0, 6.0]]


def _full_shard(prompts, responses, version, rollout_id, pid, k=2):
    r = _shard(prompts, responses, version)
    r.student_topk_ids = torch.where(r.response_mask[..., None], r.input_ids[..., None] + torch.arange(k), -1)
    r.source, r.loss_weight, r.rollout_id, r.worker_pid = "teacher", 0.5, rollout_id, pid
    return r


def test_concat_and_select_carry_every_field_exactly():
    a = _full_shard([[5, 6], [7]], [[11, 12, 13], [14]], version=3, rollout_id=8, pid=100)
    b = _full_shard([[9, 9, 9]], [[21]], version=2, rollout_id=9, pid=200)
    j = concat_rollouts([a, b])
    assert j.input_ids.tolist() == [[0, 5, 6, 11, 12, 13], [0, 0, 7, 14, 0, 0], [9, 9, 9, 21, 0, 0]]
    assert j.attention_mask.dtype == a.attention_mask.dtype
    assert j.attention_mask.tolist() == [[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert j.response_mask.tolist() == [[False] * 3 + [True] * 3, [False] * 3 + [True, False, False],
                                        [False] * 3 + [True, False, False]]
    assert j.sampled_logprobs.tolist() == [[0, 0, 0, -11, -12, -13], [0, 0, 0, -14, 0, 0], [0, 0, 0, -21, 0, 0]]
    assert j.student_topk_ids[:, :, 0].tolist() == [[-1, -1, -1, 11, 12, 13], [-1, -1, -1, 14, -1, -1],
                                                    [-1, -1, -1, 21, -1, -1]]
    assert j.student_topk_ids[0, 3].tolist() == [11, 12]
    assert (j.source, j.loss_weight, j.rollout_id, j.worker_pid, j.weight_version) == ("teacher", 0.5, 8, 100, 2)
    part = j.select(1, 3)
    for name in ("input_ids", "attention_mask", "response_mask", "sampled_logprobs", "student_topk_ids"):
        assert torch.equal(getattr(part, name), getattr(j, name)[1:3]), name
    assert part.prompt_indices == [1, 0]


def test_teacher_output_select_offsets_payload_and_joins():
    offsets = torch.tensor([0, 2, 2, 5])
    out = TeacherOutput("topk", {"ids": torch.arange(10).reshape(5, 2), "logprobs": torch.zeros(5, 2)}, offsets)
    assert out.select(0, 1).offsets.tolist() == [0, 2] and out.to(torch.device("cpu")).payload == "topk"
    assert out.select(2, 3).offsets.tolist() == [0, 3] and out.select(2, 3).rows["ids"][:, 0].tolist() == [4, 6, 8]
    assert row_offsets(torch.tensor([[True]])).dtype == torch.long
    from csd_ray.workers.trainer import concat_teacher_outputs

    one = TeacherOutput("topk", {"ids": torch.ones(1, 1, dtype=torch.long), "logprobs": torch.zeros(1, 1)},
                        torch.tensor([0, 1]))
    assert concat_teacher_outputs([out]) is out
    joined = concat_teacher_outputs([one, out, one])  # narrower first part: padded with id 0 and -inf
    assert joined.payload == "topk" and joined.offsets.tolist() == [0, 1, 3, 3, 6, 7]
    assert joined.offsets.dtype == torch.long
    assert joined.rows["ids"][0].tolist() == [1, 0] and joined.rows["logprobs"][0, 1].item() == float("-inf")
    assert joined.rows["ids"][1:6].tolist() == out.rows["ids"].tolist()


def test_concat_without_sampler_logprobs_and_with_an_empty_response():
    a = rollout_from_tokens([[5, 6]], [[7, 8]], pad_id=0)
    empty = rollout_from_tokens([[9]], [[]], pad_id=0)
    assert a.attention_mask.dtype == torch.long and a.input_ids.dtype == torch.long
    j = concat_rollouts([a, empty])
    assert j.sampled_logprobs is None and j.student_topk_ids is None
    assert j.input_ids[0].tolist() == [5, 6, 7, 8] and j.num_tokens() == 2 and j.response_mask[1].sum() == 0
    offsets = torch.tensor([0, 2])
    out = TeacherOutput("logits", {"logits": torch.zeros(2, 3)}, offsets)
    assert out.to(torch.device("cpu")).offsets is offsets and out.signal().logits is out.rows["logits"]
    with pytest.raises(AssertionError, match="^the hidden payload needs the teacher's lm_head on the trainer$"):
        TeacherOutput("hidden", {"hidden": torch.zeros(2, 3)}, offsets).signal()


def test_topk_extra_ids_lead_with_the_response_token_then_the_students_topk():
    from csd_ray.rollout import topk_extra_ids

    r = rollout_from_tokens([[5, 6], [7]], [[11, 12], [13]], pad_id=0)
    assert topk_extra_ids(r).tolist() == [[11], [12], [13]]  # one row per loss row: the token it predicts
    r.student_topk_ids = torch.arange(r.input_ids.numel() * 2).view(*r.input_ids.shape, 2)
    # The student's top-k recorded at position t+1 travels with the row predicting token t+1.
    expected = [[11, *r.student_topk_ids[0, 2].tolist()], [12, *r.student_topk_ids[0, 3].tolist()],
                [13, *r.student_topk_ids[1, 2].tolist()]]
    assert topk_extra_ids(r).tolist() == expected
