"""Dtypes and the flagship recipe (issue 11): what users run, not only fp32 tiny Llamas.

The matrix trains the smoke shape 2 steps for every teacher dtype x payload x backend; the
flagship test runs recipes/onpolicy.yaml itself with only what cannot exist here overridden.
"""

import json
import math

import pytest
import ray

from conftest import REPO, smoke_recipe
from csd_ray.config import load_recipe
from csd_ray.controller import Controller
from csd_ray.metrics import read_metrics

DTYPES = ["float32", "bfloat16", "float16"]
MATRIX = [("hf", dtype, payload) for dtype in DTYPES for payload in ("logits", "topk", "hidden")]
MATRIX += [pytest.param("vllm", dtype, "topk", marks=pytest.mark.vllm) for dtype in ("float32", "bfloat16")]


def _train(recipe):
    Controller(recipe, log=lambda m: None).run()
    return read_metrics(recipe.run.output_dir + "/metrics.jsonl")


@pytest.mark.parametrize("backend, dtype, payload", MATRIX)
def test_every_teacher_dtype_payload_and_backend_trains(ray_session, tmp_path, backend, dtype, payload):
    if backend == "vllm":
        pytest.importorskip("vllm")
    recipe = smoke_recipe(tmp_path, "run.steps=2", f"teacher_model.dtype={dtype}", f"teacher.payload={payload}",
                          f"teacher.backend={backend}", "teacher.topk=64")  # 64 > vLLM's default cap of 20
    records = _train(recipe)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 and not r["skipped_nonfinite"] for r in records), records
    assert records[-1]["weight_version"] == 2


def test_mixed_precision_trainer_computes_in_bf16_and_keeps_fp32_master_weights(ray_session, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    losses = {}
    for param_dtype in ("float32", "bfloat16"):
        recipe = smoke_recipe(tmp_path / param_dtype, "run.steps=2", f"trainer.param_dtype={param_dtype}",
                              "student_model.dtype=bfloat16", "teacher_model.dtype=bfloat16")
        records = _train(recipe)
        assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
        losses[param_dtype] = records[0]["loss"]
    # Same data and weights: bf16 compute changes the loss by bf16 rounding, not more.
    assert losses["float32"] != losses["bfloat16"]
    assert abs(losses["float32"] - losses["bfloat16"]) < 0.05 * losses["float32"]
    meta = FileSystemReader(str(tmp_path / "bfloat16" / "checkpoints" / "step_000002")).read_metadata()
    weights = {k: v for k, v in meta.state_dict_metadata.items() if k.startswith("model.") and k.endswith(".weight")}
    assert weights and {str(v.properties.dtype) for v in weights.values()} == {"torch.float32"}


@pytest.mark.vllm
def test_the_flagship_recipe_trains_here_with_only_what_cannot_exist_overridden(ray_session, family_folder, tmp_path):
    pytest.importorskip("vllm")
    teacher, student = family_folder("qwen2"), family_folder("qwen2", seed=1, num_layers=1)
    data = tmp_path / "gsm8k.jsonl"  # the hub dataset cannot be fetched here: the same fields, locally
    data.write_text("".join(json.dumps({"question": f"Tom has {i} apples and buys {i + 2}. How many now?",
                                        "answer": f"{i} + {i + 2} = {2 * i + 2} #### {2 * i + 2}"}) + "\n"
                            for i in range(40)))
    infra = "{num_gpus: 0, num_cpus: 0.25, resources: {}}"
    overrides = [
        # model paths: Qwen2-style fixtures (bf16, padded vocabulary, sampling generation_config, two eos ids)
        f"teacher_model.path={teacher}", f"student_model.path={student}",
        f"data.source={data}",
        # sizes
        f"run.output_dir={tmp_path / 'run'}", "run.steps=4", "run.checkpoint_every=2", "run.eval_every=2",
        "run.eval_max_new_tokens=8", "data.eval_size=4", "data.max_prompt_tokens=96",
        "batch.prompts_per_step=4", "batch.samples_per_prompt=2", "batch.max_new_tokens=12",
        "batch.curriculum.start_tokens=6", "batch.curriculum.warmup_steps=2", "trainer.micro_batch_size=2",
        "trainer.num_ranks=2", "sampler.replicas=1", "teacher.replicas=1",
        # placement (CPU) and weight transfer (object store)
        "run.cluster=", f"sampler.placement={infra}", f"teacher.placement={infra}", f"trainer.placement={infra}",
        "sampler.weight_transfer=object_store",
    ]
    recipe = load_recipe(REPO / "recipes" / "onpolicy.yaml", overrides)
    assert (recipe.sampler.backend, recipe.teacher.payload, recipe.run.mode) == ("vllm", "hidden", "async")
    assert (recipe.teacher_model.dtype, recipe.student_model.dtype) == ("bfloat16", "bfloat16")
    final = Controller(recipe, log=lambda m: None).run()

    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and not r["skipped_nonfinite"] for r in records)
    assert [r["max_new_tokens"] for r in records] == [6, 9, 12, 12]  # the curriculum
    assert records[1]["lr"] < records[-1]["lr"] <= 1e-6  # warm-up of the cosine schedule
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl", kind="eval")) == 3  # before, step 2, after

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.vocab_size == 49280  # padded rows kept

    @ray.remote(num_cpus=0.25)
    def vllm_generates(folder):
        from csd_ray.workers.vllm_backend import CPU_ENV
        import os

        os.environ.update(CPU_ENV)
        from vllm import LLM, SamplingParams

        llm = LLM(model=folder, enforce_eager=True, max_model_len=64, dtype="bfloat16")
        return len(llm.generate(["2 + 2 ="], SamplingParams(max_tokens=4), use_tqdm=False)[0].outputs[0].token_ids)

    assert ray.get(vllm_generates.remote(str(final))) >= 1
