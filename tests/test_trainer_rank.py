"""One trainer rank in this process (world size 1, gloo, FSDP2-sharded tiny student): what a step
computes and reports, the learning-rate schedule, loss switches, checkpoints and the weights it hands
out. The Ray-driven group tests (test_trainer_group, test_system) check the same rank across
processes; these reach the rank's code in-process, so mutation testing (README) sees it.

One rank serves the whole module (building one costs a tokenizer and a model load); every test
starts from the same saved state with ``_fresh``, which reloads it through the rank's own
``load_checkpoint`` (itself checked by ``test_a_checkpoint_restores_weights_optimizer_schedule_and_version``)."""

import math
import time

import pytest
import torch

from conftest import free_port, smoke_recipe
from csd_ray.losses import get_loss
from csd_ray.rollout import Rollout, TeacherOutput, rollout_from_tokens, row_offsets
from csd_ray.workers.trainer import StaleRollout, TrainerRank, _to, fresh_rollout, lr_factor

HIDDEN = 64  # the smoke recipe's tiny teacher width (the 'hidden' payload's row size)


def _batch(seed: int, source: str = "student", version: int = 0, pid: int = 0, seconds: float = 0.0,
           sampled: bool = False) -> tuple[Rollout, TeacherOutput]:
    """A rollout of uneven lengths and a random 'hidden' teacher payload for it."""
    g = torch.Generator().manual_seed(seed)
    lengths = [(3, 5), (2, 2), (4, 7)]
    prompts = [torch.randint(10, 4000, (p,), generator=g).tolist() for p, _ in lengths]
    responses = [torch.randint(10, 4000, (r,), generator=g).tolist() for _, r in lengths]
    rollout = rollout_from_tokens(prompts, responses, pad_id=0, weight_version=version, source=source)
    rollout.worker_pid, rollout.seconds = pid, seconds
    if sampled:
        rollout.sampled_logprobs = -torch.rand(rollout.input_ids.shape, generator=g) * rollout.response_mask
    rows = int(rollout.target_mask().sum())
    teacher = TeacherOutput("hidden", {"hidden": torch.randn(rows, HIDDEN, generator=g)},
                            row_offsets(rollout.target_mask()), seconds=seconds / 2, worker_pid=pid + 1 if pid else 0)
    return rollout, teacher


@pytest.fixture(scope="module")
def rank(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rank")
    # Linear schedule with a 4-step warm-up over 10 steps: every step of a test has its own lr.
    # lr, betas and weight decay differ from AdamW's defaults, so that losing one shows.
    recipe = smoke_recipe(tmp, "trainer.num_ranks=1", "trainer.lr=2e-3", "trainer.warmup_steps=4",
                          "trainer.lr_schedule=linear", "run.steps=10", "trainer.weight_decay=0.02",
                          "trainer.betas=[0.8, 0.95]")
    threads = torch.get_num_threads()
    r = TrainerRank(recipe, 0, 1)
    r.init_group("127.0.0.1", free_port())
    g = torch.Generator().manual_seed(0)
    # fp64 on purpose: the rank keeps the teacher's head in fp32 whatever it is sent in.
    r.set_teacher_lm_head((0.3 * torch.randn(len(r.tokenizer), HIDDEN, generator=g, dtype=torch.float64), {}))
    r.train_on([_batch(0)])  # Adam has moments, the version is 1, the scheduler at its second step
    r.save_checkpoint(str(tmp / "start"))
    r.start, r.initial_loss, r.initial_average = str(tmp / "start"), r.module.loss, r.module.average
    yield r
    r.shutdown()
    torch.set_num_threads(threads)  # the rank sized this process's threads like an actor's


def _fresh(r: TrainerRank) -> TrainerRank:
    """The rank as the fixture left it: weights, optimizer, schedule and version reloaded, the recipe's loss."""
    assert r.load_checkpoint(r.start) == 1
    r.rank, r.recipe.trainer.grad_clip, r.recipe.student_model.dtype = 0, 1.0, "float32"
    r.module.loss, r.module.average = r.initial_loss, "token"
    return r


def _params(r) -> torch.Tensor:
    return r.parameters_vector()


def _reference_loss(r, rollout, teacher, name="csd", params=None, per_sequence=False) -> float:
    """The loss on the rank's current student logits, computed here from the teacher's hidden rows (fp64)."""
    logits = r.probe_logits(rollout).double()
    head = r.teacher_lm_head[0].double()
    teacher_logits = teacher.rows["hidden"].double() @ head.t()
    loss = get_loss(name, vocab_size=len(r.tokenizer), **(params if params is not None else {"weights": ["student"] * 2}))
    targets = rollout.input_ids[:, 1:][rollout.target_mask()]
    if not per_sequence:
        return loss(logits, teacher_logits, torch.ones(logits.shape[0], dtype=torch.bool), targets=targets)[0].item()
    o = teacher.offsets.tolist()
    return sum(loss(logits[a:b], teacher_logits[a:b], torch.ones(b - a, dtype=torch.bool), targets=targets[a:b])[0].item()
               for a, b in zip(o[:-1], o[1:])) / (len(o) - 1)


def test_the_rank_is_built_from_the_recipe(rank):
    """First in the file on purpose: the module's rank is built while this test sets up, so
    mutation testing credits the set-up code to this test alone; it checks what the set-up made
    (the state ``_fresh`` reloads is the fixture's: one step trained)."""
    import os

    r = _fresh(rank)  # mutation testing runs tests fastest first: start from the fixture's state
    assert os.environ.get("GLOO_SOCKET_IFNAME") == "lo"  # a loopback group stays on loopback
    assert torch.get_num_threads() == r.recipe.trainer.placement.torch_threads()
    group = r.optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["weight_decay"] == 0.02 and r.scheduler.base_lrs == [2e-3]
    factors = [r.scheduler.lr_lambdas[0](s) for s in range(11)]  # 4 warm-up steps, linear decay to step 10
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0])
    assert r.version == 1 and group["lr"] == pytest.approx(2e-3 * 0.5)
    assert r.teacher_lm_head[0].dtype == torch.float32 and r.teacher_lm_head[1].identity
    assert r.device.type == "cpu" and r.module.model.training and not r.module.model.is_gradient_checkpointing
    assert r.module.model.config.num_hidden_layers == 1  # the smoke recipe's student
    assert all(p.dtype == torch.float32 for p in r.module.parameters())  # fp32 master weights
    cfg = r.recipe.trainer
    assert r.initial_loss.describe() == get_loss(cfg.loss.name, **cfg.loss.params).describe()
    assert r.initial_average == cfg.loss.average == "token" and r.module.packing is cfg.packing is True
    # The recipe's loss (CSD, (student, student) weights), through the packed sdpa path:
    assert r.module.model.config._attn_implementation == "sdpa_packed"
    batch = _batch(20)
    expected = _reference_loss(r, *batch)
    assert r.train_on([batch])["loss"] == pytest.approx(expected, rel=1e-4)
    assert _reference_loss(r, *batch, params={}) != pytest.approx(expected, rel=1e-2)  # CSD's defaults differ


def test_a_step_follows_the_loss_gradient_and_reports_what_it_trained(rank):
    r = _fresh(rank)
    a, b = _batch(1, version=3, pid=700, seconds=2.0, sampled=True), _batch(2, source="teacher", version=1, pid=0)
    a[0].loss_weight, b[0].loss_weight = 1.0, 0.25
    ref_a, ref_b = _reference_loss(r, *a), _reference_loss(r, *b)
    tokens = (a[0].num_tokens(), b[0].num_tokens())
    before = _params(r)
    started = time.perf_counter()
    result = r.train_on([a, b], t_fetch=1000.0)  # a fetch time far above the step's own: misplaced signs show
    elapsed = time.perf_counter() - started
    # The step's loss is the token mean over both sources, each source's tokens weighted by its loss weight.
    expected = (ref_a * tokens[0] + 0.25 * ref_b * tokens[1]) / sum(tokens)
    assert result["loss"] == pytest.approx(expected, rel=1e-4)
    assert result["version"] == 2 and r.version == 2 and not result["skipped_nonfinite"]
    assert result["tokens"] == sum(tokens) == 28 and result["sequences"] == 6
    assert result["lr"] == pytest.approx(2e-3 * 0.5)  # scheduler's second warm-up step
    assert result["rollout_version"] == 3  # the oldest student rollout; teacher samples carry no version
    assert result["sampled_logprob_mean"] == pytest.approx(float(a[0].sampled_logprobs.sum()) / tokens[0])
    assert result["payload_bytes"] == a[1].nbytes() + b[1].nbytes() == 28 * HIDDEN * 4
    assert result["worker_pids"] == [700, 701]  # pid 0 (made in the controller) is no worker
    assert (result["time_sample"], result["time_score"], result["time_fetch"]) == (2.0, 1.0, 1000.0)
    assert 0 <= result["time_forward_backward"] and 0 <= result["time_optimizer"]
    assert result["time_forward_backward"] + result["time_optimizer"] <= elapsed  # parts of this call
    assert result["grad_norm"] > 0 and math.isfinite(result["grad_norm"])
    after = _params(r)
    assert (after - before).abs().max() > 1e-4
    assert all(p.grad is None for p in r.module.parameters())  # nothing carries over into the next step
    # Downhill: the same batch's loss is lower on the new weights.
    assert _reference_loss(r, *a) < ref_a


def test_a_step_without_student_rollouts_reports_no_version_and_no_logprobs(rank):
    r = _fresh(rank)
    result = r.train_on([_batch(3, source="dataset", version=5)])
    assert result["rollout_version"] is None and result["sampled_logprob_mean"] is None
    assert result["worker_pids"] == []


def test_sequence_average_weighs_every_sequence_alike(rank):
    r = _fresh(rank)
    batch = _batch(4)
    expected = _reference_loss(r, *batch, per_sequence=True)
    assert abs(expected - _reference_loss(r, *batch)) > 1e-3  # the two averages differ on this batch
    spec = {"name": "csd", "params": {"weights": ["student", "student"]}, "average": "sequence"}
    result = r.train_on([batch], loss=spec)
    assert r.module.average == "sequence"
    assert result["loss"] == pytest.approx(expected, rel=1e-4)


def test_a_stage_switches_the_loss_and_keeps_each_loss_built_once(rank):
    r = _fresh(rank)
    batch = _batch(5)
    fkl = {"name": "fkl", "params": {}}
    expected = _reference_loss(r, *batch, name="fkl", params={})
    assert abs(expected - _reference_loss(r, *batch)) > 1e-3
    result = r.train_on([batch], loss=fkl)
    assert result["loss"] == pytest.approx(expected, rel=1e-4)
    built = r.module.loss
    assert r.module.average == "token"
    r._use({"name": "rkl", "params": {}, "chunk_size": 7}, None)
    assert r.module.loss.chunk_size == 7 and r.module.loss is not built
    r._use(dict(fkl), None)
    assert r.module.loss is built  # the same spec: the loss built before
    # A loss on the response tokens themselves (SFT's cross-entropy): the rank hands it the targets.
    r = _fresh(rank)
    expected = _reference_loss(r, *batch, name="ce", params={})
    assert r.train_on([batch], loss={"name": "ce", "params": {}})["loss"] == pytest.approx(expected, rel=1e-4)


def test_learning_rate_follows_the_schedule_and_a_stage_lr_applies_at_once(rank):
    r = _fresh(rank)
    lrs = [r.train_on([_batch(6)])["lr"]]  # schedule step 1 of a 4-step warm-up
    lrs.append(r.train_on([_batch(6)], lr=4e-3)["lr"])  # a new stage's lr, at its schedule factor
    lrs += [r.train_on([_batch(6)])["lr"] for _ in range(3)]
    assert lrs == pytest.approx([2e-3 * 2 / 4, 4e-3 * 3 / 4, 4e-3, 4e-3, 4e-3 * (1 - 1 / 6)])
    assert r.scheduler.base_lrs == [4e-3]


@pytest.mark.parametrize("average", ["token", "sequence"])
def test_micro_batches_and_padding_change_nothing_but_rounding(rank, average):
    """A step split into micro-batches (by tokens or sequences), or run padded instead of packed,
    gives the loss and update of the step in one packed batch."""
    spec = {"name": "csd", "params": {"weights": ["student", "student"]}, "average": average}
    outcomes = []
    for tokens, sequences, packing in ((0, 0, True), (9, 0, True), (0, 1, True), (0, 0, False)):
        r = _fresh(rank)
        r.recipe.trainer.micro_batch_tokens, r.recipe.trainer.micro_batch_size, r.module.packing = tokens, sequences, packing
        try:
            result = r.train_on([_batch(18), _batch(19, source="teacher")], loss=spec)
        finally:
            r.recipe.trainer.micro_batch_tokens, r.recipe.trainer.micro_batch_size, r.module.packing = 0, 0, True
        outcomes.append((result["loss"], result["grad_norm"], _params(r)))
    loss, norm, params = outcomes[0]
    for other_loss, other_norm, other_params in outcomes[1:]:
        assert other_loss == pytest.approx(loss, rel=1e-5) and other_norm == pytest.approx(norm, rel=1e-4)
        # Adam divides by the gradients' scale: rounding shows up to ~2e-6 in weights that move by ~5e-4.
        assert torch.allclose(other_params, params, rtol=0, atol=1e-5)


def test_a_nonfinite_step_changes_no_weight_and_the_next_step_trains(rank):
    r = _fresh(rank)
    rollout, teacher = _batch(7)
    teacher.rows["hidden"][2] = 1e30  # finite logits whose squared differences overflow fp32
    before = _params(r)
    result = r.train_on([(rollout, teacher)])
    assert result["skipped_nonfinite"] and result["version"] == 1 and r.version == 1
    assert not math.isfinite(result["loss"])
    assert torch.equal(_params(r), before)
    assert all(p.grad is None for p in r.module.parameters())
    nxt = r.train_on([_batch(7)])
    assert not nxt["skipped_nonfinite"] and nxt["version"] == 2 and math.isfinite(nxt["loss"])
    assert nxt["lr"] == pytest.approx(2e-3 * 3 / 4)  # the schedule advanced over the skipped step
    assert (_params(r) - before).abs().max() > 1e-4


def _applied_gradient(r, batch) -> tuple[float, float]:
    """(reported grad norm, norm of the gradient Adam took in), the latter read back from Adam's
    first moment: exp_avg' = beta1 * exp_avg + (1 - beta1) * g."""
    beta1 = r.optimizer.param_groups[0]["betas"][0]

    def moments():
        return [r.optimizer.state[p]["exp_avg"] for p in r.module.parameters()]

    old = [(m.full_tensor() if hasattr(m, "full_tensor") else m).double() for m in moments()]
    reported = r.train_on([batch])["grad_norm"]
    new = [(m.full_tensor() if hasattr(m, "full_tensor") else m).double() for m in moments()]
    return reported, math.sqrt(sum(float((((n - beta1 * o) / (1 - beta1)) ** 2).sum()) for n, o in zip(new, old)))


def test_gradient_clipping_scales_the_applied_gradient_and_zero_turns_it_off(rank):
    r = _fresh(rank)
    r.recipe.trainer.grad_clip = 0.0
    norm, applied = _applied_gradient(r, _batch(8))
    assert norm > 1e-3 and applied == pytest.approx(norm, rel=1e-3)  # 0: no clipping
    r = _fresh(rank)
    r.recipe.trainer.grad_clip = norm / 2
    reported, applied = _applied_gradient(r, _batch(8))
    assert reported == pytest.approx(norm, rel=1e-5)  # the norm before clipping is what gets logged
    assert applied == pytest.approx(norm / 2, rel=1e-3)


def test_a_checkpoint_restores_weights_optimizer_schedule_and_version(rank, tmp_path):
    r = _fresh(rank)
    r.train_on([_batch(9)])
    r.save_checkpoint(str(tmp_path / "a"))
    state = torch.load(tmp_path / "a" / "trainer_state.pt", weights_only=False)
    assert state["version"] == 2 and state["scheduler"]["last_epoch"] == 2
    saved = _params(r)
    second = r.train_on([_batch(10)])
    after_second = _params(r)
    r.train_on([_batch(11)], lr=5e-2)
    assert r.load_checkpoint(str(tmp_path / "a")) == 2 and r.version == 2
    assert torch.equal(_params(r), saved)
    again = r.train_on([_batch(10)])
    # Same lr, loss and update: the optimizer's moments and the schedule came back with the weights.
    assert again["lr"] == second["lr"] and again["version"] == 3
    assert again["loss"] == pytest.approx(second["loss"], rel=1e-6)
    assert torch.allclose(_params(r), after_second, rtol=0, atol=1e-7)
    r.rank = 1  # only rank 0 writes the controller-independent trainer state
    r.save_checkpoint(str(tmp_path / "b"))
    assert not (tmp_path / "b" / "trainer_state.pt").exists() and (tmp_path / "b" / ".metadata").exists()
    r.rank = 0


def test_full_weights_carry_hf_names_and_the_sampler_dtype(rank, tmp_path):
    from transformers import AutoModelForCausalLM

    r = _fresh(rank)
    state = r.full_state_dict()
    reference = AutoModelForCausalLM.from_config(r.module.model.config).state_dict()
    assert set(state) == set(reference)
    assert all(state[k].shape == reference[k].shape and state[k].device.type == "cpu" for k in state)
    vector = _params(r)
    assert torch.equal(vector, torch.cat([state[k].flatten().double() for k in sorted(state)]))
    names, dtypes, shapes = r.weight_metadata()
    assert names == sorted(state) and dtypes == ["float32"] * len(names)
    assert shapes == [list(state[n].shape) for n in names]
    r.recipe.student_model.dtype = "bfloat16"
    host = r.host_weights().to_state_dict()
    assert set(host) == set(state) and all(t.dtype == torch.bfloat16 for t in host.values())
    assert all(torch.equal(host[k], state[k].to(torch.bfloat16)) for k in state)
    assert r.weight_metadata()[1] == ["bfloat16"] * len(names)
    r.recipe.student_model.dtype = "float32"
    # Other ranks take part in the gather but hold no copy.
    r.rank = 1
    assert (r.full_state_dict(), r.host_weights(), r.parameters_vector(), r.save_hf(str(tmp_path / "x"))) == (None,) * 4
    assert not (tmp_path / "x").exists()
    r.rank = 0


def test_the_written_hf_folder_and_the_probe_give_the_ranks_logits(rank, tmp_path):
    from transformers import AutoModelForCausalLM

    r = _fresh(rank)
    r.train_on([_batch(12)])  # weights that differ from the model's initial ones
    rollout, _ = _batch(13)
    assert r.save_hf(str(tmp_path / "hf")) == str(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    state = r.full_state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                       position_ids=(rollout.attention_mask.cumsum(1) - 1).clamp_min(0)).logits
    expected = logits[:, :-1][rollout.target_mask()]
    probe = r.probe_logits(rollout)
    assert probe.shape == expected.shape == (14, len(r.tokenizer))
    assert torch.allclose(probe, expected, rtol=1e-4, atol=1e-4)
    r.rank = 1
    assert r.probe_logits(rollout) is None
    r.rank = 0


def test_fresh_rollout_joins_shards_and_refuses_stale_student_samples():
    a, _ = _batch(14, version=4, pid=9)
    b, _ = _batch(15, version=5, pid=9)
    joined = fresh_rollout([a, b], 0.5, 4)
    assert joined.num_sequences == 6 and joined.loss_weight == 0.5 and joined.weight_version == 4
    assert fresh_rollout([b], 2.0, None).loss_weight == 2.0
    with pytest.raises(StaleRollout, match=r"^rollout sampled with weights v4 by pid 9, older than the allowed v5$"):
        fresh_rollout([a], 1.0, 5)
    old_teacher, _ = _batch(16, source="teacher", version=0)
    assert fresh_rollout([old_teacher], 1.0, 5).source == "teacher"  # teacher samples do not age


def test_lr_factor_warms_up_then_decays():
    assert [lr_factor(s, 2, 6, "linear") for s in range(7)] == pytest.approx([0.5, 1, 1, 0.75, 0.5, 0.25, 0])
    assert [lr_factor(s, 0, 4, "cosine") for s in (0, 2, 4, 9)] == pytest.approx([1, 0.5, 0, 0])
    assert lr_factor(3, 4, 8, "constant") == 1 and lr_factor(5, 4, 8, "constant") == 1
    assert lr_factor(5, 4, 4, "linear") == 1  # nothing left to decay over


def test_rollouts_move_to_the_rank_device_and_stay_put_on_cpu():
    rollout, _ = _batch(17)
    assert _to(rollout, torch.device("cpu")) is rollout
    moved = _to(_batch(17)[0], torch.device("meta"))
    assert all(getattr(moved, n).device.type == "meta" for n in ("input_ids", "attention_mask", "response_mask"))


def test_the_group_address_is_this_node_and_a_free_port(rank):
    import socket

    host, port = rank.address()
    with socket.socket() as s:  # free: rank 0 binds it for the group's TCP store
        s.bind((host, port))
    assert host == socket.gethostbyname(host) and 1024 <= port < 65536



def test_the_loss_rows_logits_equal_each_sequence_run_alone_through_the_model(rank):
    """The packed forward (one row, per-sequence attention bounds and positions) gives, at every
    loss row, the logits of the HF model run on that sequence alone: no sequence sees another."""
    r = _fresh(rank)
    rollout, _ = _batch(3)
    packed = r.probe_logits(rollout)
    expected = []
    with torch.no_grad():
        for i in range(rollout.num_sequences):
            real = rollout.attention_mask[i].bool()
            alone = r.module.model(input_ids=rollout.input_ids[i][real][None]).logits[0]
            position = torch.cumsum(real.long(), 0) - 1  # padded position -> index among the real tokens
            rows = rollout.target_mask()[i].nonzero()[:, 0]
            expected.append(alone[position[rows]])
    expected = torch.cat(expected)[:, : packed.shape[1]]
    assert packed.shape == expected.shape and torch.allclose(packed, expected, atol=1e-4)
