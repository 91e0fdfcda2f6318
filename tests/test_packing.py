"""A trainer that wastes nothing on padding (issue 13): packed sequences, token-budget micro-batches,
activation checkpointing and bf16 compute give the loss and gradients of the padded fp32 trainer.

Real trainer ranks (world size 1, gloo, FSDP2-sharded) on the family fixtures of tests/families.py;
each test compares two ways of computing the same step on a batch of uneven lengths."""

import pytest
import torch

from conftest import family_recipe, free_port
from csd_ray.config import ConfigError
from csd_ray.rollout import TeacherOutput, micro_batches, packed_layout, rollout_from_tokens, row_offsets

PROMPTS = (5, 11, 3, 8, 6, 4)  # tokens per prompt
RESPONSES = (14, 2, 9, 1, 6, 11)  # tokens per response: uneven, as on-policy samples are


def _batch(seed: int = 0, vocab: int = 40000, hidden: int = 128):
    """A rollout of uneven prompt and response lengths and a random 'hidden' teacher payload."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPTS]
    responses = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in RESPONSES]
    rollout = rollout_from_tokens(prompts, responses, pad_id=0)
    rows = int(rollout.target_mask().sum())
    teacher = TeacherOutput("hidden", {"hidden": torch.randn(rows, hidden, generator=g)},
                            row_offsets(rollout.target_mask()))
    return rollout, teacher


def _gradients(recipe, rollout, teacher) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, full gradient of every parameter) of one accumulation on a fresh trainer rank."""
    from csd_ray.workers.trainer import TrainerRank

    threads = torch.get_num_threads()
    rank = TrainerRank(recipe, 0, 1)
    rank.init_group("127.0.0.1", free_port())
    try:
        head = rank.module.model.get_output_embeddings().weight
        g = torch.Generator().manual_seed(7)
        full = head.full_tensor() if hasattr(head, "full_tensor") else head
        rank.set_teacher_lm_head((full.detach() + 0.05 * torch.randn(full.shape, generator=g), {}))
        normalizer = float(rollout.num_tokens() if recipe.trainer.loss.average == "token" else rollout.num_sequences)
        loss = float(rank.accumulate_gradients([(rollout, teacher)], normalizer))
        grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                 for n, p in rank.module.named_parameters() if p.grad is not None}
    finally:
        rank.shutdown()
        torch.set_num_threads(threads)  # the rank sized this process's threads like an actor's
    return loss, grads


def _assert_same(a, b, rel=1e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=rel)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 5
    for name in grads_a:
        scale = grads_b[name].abs().max().clamp_min(1e-12)
        error = float((grads_a[name] - grads_b[name]).abs().max() / scale)
        assert error < rel * 10, f"{name}: gradients differ by {error:.2e} of their largest entry"


def _recipe(family_folder, tmp_path, family, *overrides):
    folder = family_folder(family)
    return family_recipe(tmp_path, folder, folder, "trainer.num_ranks=1", "trainer.loss.params.weights=[teacher,student]",
                         *overrides)


def test_packed_layout_restarts_positions_and_maps_every_loss_row():
    rollout = rollout_from_tokens([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0)
    ids, positions, rows = packed_layout(rollout)
    assert ids.tolist() == [[1, 2, 4, 5, 6, 3, 7]]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    # Loss rows predict 4, 5, 6 (from packed positions 1, 2, 3) and 7 (from 5), in target_mask order.
    assert rows.tolist() == [1, 2, 3, 5]
    assert torch.equal(ids[0, rows + 1], rollout.input_ids[:, 1:][rollout.target_mask()])
    with pytest.raises(ValueError, match="follows padding"):
        packed_layout(rollout_from_tokens([[1, 2], []], [[4], [7]], pad_id=0))


@pytest.mark.parametrize("window", [None, 3])
def test_packed_attention_runs_each_sequence_alone_with_its_mask(window):
    """packed_sdpa_forward = transformers' sdpa over the whole packed row with its block-diagonal
    (and sliding-window) mask, computed block by block."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from csd_ray.workers.trainer import packed_sdpa_forward

    lengths = [5, 1, 7, 4]
    bounds = torch.tensor([0, 5, 6, 13, 17])
    seq = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    i = torch.arange(17)
    mask = (seq[:, None] == seq[None, :]) & (i[None, :] <= i[:, None])
    if window:
        mask &= i[:, None] - i[None, :] < window
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 17, 8, generator=g, dtype=torch.float64) for _ in range(3))
    module = SimpleNamespace(num_key_value_groups=1, is_causal=True)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask[None, None])
    got, _ = packed_sdpa_forward(module, q, k, v, mask[None, None], cu_seq_lens_q=bounds)
    assert got.shape == expected.shape == (1, 17, 4, 8)
    assert torch.allclose(got, expected, atol=1e-12, rtol=0)
    # Without the boundaries it is sdpa over the row; boundaries that cut a sequence change it.
    assert torch.equal(packed_sdpa_forward(module, q, k, v, mask[None, None])[0], expected)
    wrong, _ = packed_sdpa_forward(module, q, k, v, mask[None, None], cu_seq_lens_q=torch.tensor([0, 3, 6, 13, 17]))
    assert not torch.allclose(wrong, expected)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma2"])
def test_packed_and_padded_forwards_give_the_same_loss_and_gradients(family_folder, tmp_path, family):
    rollout, teacher = _batch()
    padded = _gradients(_recipe(family_folder, tmp_path, family, "trainer.packing=false"), rollout, teacher)
    packed = _gradients(_recipe(family_folder, tmp_path, family, "trainer.packing=true"), rollout, teacher)
    _assert_same(packed, padded)


def test_micro_batches_keep_the_token_budget_and_order():
    rollout, _ = _batch()
    lengths = rollout.attention_mask.sum(1).tolist()  # 19, 13, 12, 9, 12, 15
    ranges = micro_batches(rollout, max_tokens=30)
    assert ranges == [(0, 1), (1, 3), (3, 5), (5, 6)]
    assert all(sum(lengths[a:b]) <= 30 or b - a == 1 for a, b in ranges)
    assert micro_batches(rollout, max_tokens=10) == [(i, i + 1) for i in range(6)]  # each alone over the budget
    assert micro_batches(rollout, max_sequences=2, max_tokens=40) == [(0, 2), (2, 4), (4, 6)]
    # Padded: rows x the widest row of the micro-batch (prompts left-padded, responses right-padded).
    assert micro_batches(rollout, max_tokens=60, packed=False) == [(0, 2), (2, 5), (5, 6)]  # 2x25, 3x17, 1x15
    # Ranks must run as many passes as the rank with the most: wide ranges are halved.
    assert micro_batches(rollout, max_tokens=1000) == [(0, 6)]
    assert micro_batches(rollout, max_tokens=1000, at_least=3) == [(0, 1), (1, 3), (3, 6)]
    assert micro_batches(rollout, max_sequences=3, at_least=4) == [(0, 1), (1, 3), (3, 4), (4, 6)]
    assert len(micro_batches(rollout, at_least=9)) == 6  # never an empty micro-batch


@pytest.mark.parametrize("average", ["token", "sequence"])
def test_token_budget_micro_batches_give_the_gradient_of_one_batch(family_folder, tmp_path, average):
    rollout, teacher = _batch(1)
    overrides = (f"trainer.loss.average={average}",)
    whole = _gradients(_recipe(family_folder, tmp_path, "llama3", *overrides), rollout, teacher)
    budget = _gradients(_recipe(family_folder, tmp_path, "llama3", *overrides, "trainer.micro_batch_tokens=30"),
                        rollout, teacher)
    _assert_same(budget, whole)


def _saved_bytes(recipe, rollout, teacher) -> int:
    """Bytes autograd keeps for backward during one forward of a trainer rank's module."""
    from csd_ray.workers.trainer import TrainerRank

    threads = torch.get_num_threads()
    rank = TrainerRank(recipe, 0, 1)
    rank.init_group("127.0.0.1", free_port())
    saved = []

    tokens = int(rollout.attention_mask.sum())  # the packed row's length

    def keep(t):
        if tokens in t.shape:  # activations (parameters are kept either way)
            saved.append(t.numel() * t.element_size())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            rank.module(rollout)  # the student's logits at the loss rows (through the root: FSDP unshards)
    finally:
        rank.shutdown()
        torch.set_num_threads(threads)
    return sum(saved)


def test_activation_checkpointing_gives_the_same_gradient_and_keeps_fewer_activations(family_folder, tmp_path):
    rollout, teacher = _batch(2)
    plain = _recipe(family_folder, tmp_path, "qwen2")
    checkpointed = _recipe(family_folder, tmp_path, "qwen2", "trainer.activation_checkpointing=true")
    _assert_same(_gradients(checkpointed, rollout, teacher), _gradients(plain, rollout, teacher))
    assert _saved_bytes(checkpointed, rollout, teacher) < 0.5 * _saved_bytes(plain, rollout, teacher)


def test_bf16_compute_with_packing_matches_padded_and_fp32(family_folder, tmp_path):
    rollout, teacher = _batch(3)
    fp32 = _gradients(_recipe(family_folder, tmp_path, "llama3"), rollout, teacher)
    results = {packing: _gradients(_recipe(family_folder, tmp_path, "llama3", "trainer.param_dtype=bfloat16",
                                           f"trainer.packing={packing}"), rollout, teacher)
               for packing in ("true", "false")}
    for packing, (loss, grads) in results.items():
        assert loss == pytest.approx(fp32[0], rel=2e-2), packing
        flat = torch.cat([grads[n].flatten() for n in sorted(grads)])
        reference = torch.cat([fp32[1][n].flatten() for n in sorted(grads)])
        assert float(torch.nn.functional.cosine_similarity(flat, reference, dim=0)) > 0.99, packing


@pytest.mark.parametrize("override, message", [
    ("trainer.micro_batch_tokens=-1", "trainer.micro_batch_tokens: must be >= 0, got -1"),
    ("trainer.micro_batch_tokens=16", "trainer.micro_batch_tokens: must be 0 (no budget) or more than the longest "
     "response, 16 tokens (max_new_tokens), so a whole sequence fits; got 16"),
    ("trainer.packing=maybe", "trainer.packing: expected true or false, got 'maybe'"),
    ("trainer.activation_checkpointing=1", "trainer.activation_checkpointing: expected true or false, got 1"),
])
def test_bad_trainer_options_are_refused_with_the_key(tmp_path, override, message):
    from conftest import smoke_recipe

    with pytest.raises(ConfigError) as err:
        smoke_recipe(tmp_path, override)
    assert message in str(err.value) and "override" in str(err.value)
