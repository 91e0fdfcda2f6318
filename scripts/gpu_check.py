"""A few minutes on one CUDA GPU: the paths that can run there without Ray or vLLM (issue 11).

    bash scripts/gpu_check.sh            # on a machine with one CUDA GPU
    CSD_GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh   # rehearsal of the same script on a CPU

Runs, and prints what it measured:
1. the HF sampler and teacher code paths (load_role_model: models on the role's device, the
   generation contract) on a Qwen2-style fixture in bf16: a batch sampled on the GPU, its
   recorded log-probs against a fp32 forward of the same weights, payloads built on the GPU;
2. one trainer rank (TrainerRank) in bf16 mixed precision on an nccl group of world size 1
   through a full train step (fused CSD loss, hidden payload, optimizer step) and a second step;
3. the fused loss in bf16 against fp32 at a Qwen-like vocabulary (value and gradient error, time).
Needs torch and transformers only (plus this repository on PYTHONPATH).
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

DEVICE = os.environ.get("CSD_GPU_CHECK_DEVICE", "cuda")


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (set CSD_GPU_CHECK_DEVICE=cpu for a CPU rehearsal)")
        return 2
    from csd_ray.config import recipe_from_dict
    from csd_ray.generation import SamplingSpec
    from csd_ray.losses import HiddenTeacher, get_loss
    from csd_ray.rollout import TeacherOutput, row_offsets
    from csd_ray.workers.hf_generate import forward_hidden, hf_generate, load_role_model, response_logprobs
    from csd_ray.workers.trainer import TrainerRank
    from families import build

    gpus = 1 if DEVICE == "cuda" else 0
    print(f"gpu_check: torch {torch.__version__}, device {torch.cuda.get_device_name(0) if gpus else 'cpu'}")
    work = Path(tempfile.mkdtemp(prefix="csd_gpu_check"))
    teacher_dir, student_dir = build("qwen2", work / "teacher"), build("qwen2", work / "student", seed=1, num_layers=1)
    placement = {"num_gpus": gpus, "num_cpus": 1}
    recipe = recipe_from_dict({
        "run": {"steps": 2, "output_dir": str(work / "run")},
        "teacher_model": {"path": str(teacher_dir), "dtype": "bfloat16"},
        "student_model": {"path": str(student_dir), "dtype": "bfloat16"},
        "sampler": {"placement": placement}, "teacher": {"placement": placement, "payload": "hidden"},
        "trainer": {"placement": placement, "param_dtype": "bfloat16", "lr": 1e-4,
                    "loss": {"name": "csd", "params": {"weights": ["teacher", "student"]}}},
        "batch": {"prompts_per_step": 8, "max_new_tokens": 32},
    })

    # 1. HF sampler / teacher paths on the device.
    tok, student, rules = load_role_model(recipe.student_model, gpus, "sampler")
    _, teacher, _ = load_role_model(recipe.teacher_model, gpus, "teacher")
    prompts = [tok(f"Question {i}: what is {i} + {i}?")["input_ids"] for i in range(8)]
    t0 = time.perf_counter()
    rollout = hf_generate(student, prompts, SamplingSpec(32, seed=0), rules)
    _sync()
    t_gen = time.perf_counter() - t0
    fp32 = student.float()
    exact = response_logprobs(fp32, rollout, rules.vocab_size)
    student.to(torch.bfloat16)
    gap = float((rollout.sampled_logprobs - exact)[rollout.response_mask].abs().max())
    print(f"[1] sampler on {student.device}: {rollout.num_tokens()} tokens in {t_gen:.2f} s; "
          f"bf16 sampled log-probs vs fp32 forward: max |diff| {gap:.3g} nats")
    with torch.no_grad():
        hidden = forward_hidden(teacher, rollout)[:, :-1][rollout.target_mask().to(teacher.device)]
    payload = TeacherOutput("hidden", {"hidden": hidden.cpu()}, row_offsets(rollout.target_mask()))
    print(f"[1] teacher on {teacher.device}: hidden payload {tuple(hidden.shape)} {hidden.dtype}")

    # 2. One trainer rank, bf16 mixed precision, nccl (gloo on the CPU rehearsal), two full steps.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    rank = TrainerRank(recipe, 0, 1)
    rank.init_group("127.0.0.1", _port())
    head = teacher.get_output_embeddings().weight.detach().cpu()
    rank.set_teacher_lm_head((head, {"scale": 1.0, "softcap": None}))
    for step in (1, 2):
        t0 = time.perf_counter()
        result = rank.train_on([(rollout, payload)], lr=1e-4)
        _sync()
        print(f"[2] trainer step {step} on {rank.device} ({torch.distributed.get_backend()}, bf16 compute, fp32 master): "
              f"loss {result['loss']:.4f}, grad norm {result['grad_norm']:.4f}, {time.perf_counter() - t0:.2f} s, "
              f"finite={not result['skipped_nonfinite']}")
    rank.shutdown()

    # 3. Fused loss, bf16 inputs against fp32 inputs.
    n, d, v = (8192, 1536, 151936) if gpus else (512, 256, 151936)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    h = torch.randn(n, d, device=DEVICE, generator=g) * 0.5
    w = torch.randn(v, d, device=DEVICE, generator=g) * 0.05
    th, tw = torch.randn(n, d, device=DEVICE, generator=g) * 0.5, torch.randn(v, d, device=DEVICE, generator=g) * 0.05
    mask = torch.ones(n, dtype=torch.bool, device=DEVICE)
    loss = get_loss("csd", weights=["teacher", "student"], vocab_size=v)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        hh, ww = h.detach().to(dtype).requires_grad_(True), w.detach().to(dtype).requires_grad_(True)
        _sync()
        t0 = time.perf_counter()
        value, _ = loss.fused(hh, ww, HiddenTeacher(th.to(dtype), tw), mask)
        value.backward()
        _sync()
        out[dtype] = (float(value), hh.grad.float(), time.perf_counter() - t0)
    (v32, g32, t32), (v16, g16, t16) = out[torch.float32], out[torch.bfloat16]
    rel = float((g16 - g32).norm() / g32.norm())
    print(f"[3] fused CSD loss N={n} d={d} V={v}: fp32 {v32:.6f} in {t32:.2f} s, bf16 {v16:.6f} in {t16:.2f} s; "
          f"value rel. diff {abs(v16 - v32) / abs(v32):.2e}, grad rel. diff {rel:.2e}, bf16/fp32 time {t16 / t32:.2f}")
    print("gpu_check: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
