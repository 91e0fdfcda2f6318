"""A few minutes on one CUDA GPU: the paths that can run there without Ray or vLLM (issue 11).

    bash scripts/gpu_check.sh            # on a machine with one CUDA GPU
    CSD_GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh   # rehearsal of the same script on a CPU
    bash scripts/gpu_check.sh --perf-only                 # part 4 (performance) alone

Runs, and prints what it measured:
1. the HF sampler and teacher code paths (load_role_model: models on the role's device, the
   generation contract) on a Qwen2-style fixture in bf16: a batch sampled on the GPU, its
   recorded log-probs against a fp32 forward of the same weights, payloads built on the GPU;
2. one trainer rank (TrainerRank) in bf16 mixed precision on an nccl group of world size 1
   through a full train step (fused CSD loss, hidden payload, optimizer step) and a second step;
3. the fused loss in bf16 against fp32 at a Qwen-like vocabulary (value and gradient error, time);
4. performance (issue 13), bf16 at Qwen scale (N=8192, d=1536, V=151936; N=256, d=256 on the CPU
   rehearsal): each fused loss against its floor (the four bare matmuls on the same chunks,
   bench/loss_memory.py), and csd_ray's generalized JSD against Liger-Kernel's fused linear JSD.
   Liger is pip-installed (`liger-kernel==0.8.5`, --no-deps: torch and triton are there) where
   absent; CSD_GPU_CHECK_WHEELS=DIR installs it offline from a folder holding the wheel. Where
   the install fails, or on the CPU (Liger's kernels are Triton/CUDA), that comparison is
   skipped with a line saying why.
Needs torch and transformers only (plus this repository on PYTHONPATH).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import subprocess
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
    if "--perf-only" in sys.argv[1:]:  # part 4 alone
        perf(gpus)
        print("gpu_check: ok")
        return 0
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
    perf(gpus)
    print("gpu_check: ok")
    return 0


def _timed(fn, repeats: int = 3) -> tuple[float, float]:
    """(best seconds of ``repeats`` synchronised calls after a warm-up, peak device GiB or None on the CPU)."""
    fn()
    _sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None
    return best, peak


def _gib(peak) -> str:
    return "n/a on the CPU" if peak is None else f"{peak:.2f} GiB"


def _liger_jsd():
    """Liger-Kernel's LigerFusedLinearJSD class, or (None, why not)."""
    def load():
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
        return LigerFusedLinearJSD

    if DEVICE != "cuda":
        return None, "Liger-Kernel's fused JSD is a Triton kernel for CUDA: comparison skipped on the CPU rehearsal"
    try:
        return load(), None
    except ImportError:
        pass
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "liger-kernel==0.8.5"]
    if os.environ.get("CSD_GPU_CHECK_WHEELS"):
        cmd += ["--no-index", "--find-links", os.environ["CSD_GPU_CHECK_WHEELS"]]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"pip install liger-kernel==0.8.5 did not run ({exc}): Liger comparison skipped"
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"pip install liger-kernel==0.8.5 failed ({why}): Liger comparison skipped"
    importlib.invalidate_caches()
    try:
        return load(), None
    except Exception as exc:  # installed but unusable (e.g. a triton it does not support)
        return None, f"liger-kernel installed but does not import ({type(exc).__name__}: {exc}): Liger comparison skipped"


def perf(gpus: int) -> None:
    """[4] Fused losses against their matmul floor and against Liger's fused JSD, bf16."""
    spec = importlib.util.spec_from_file_location("loss_memory", REPO / "bench" / "loss_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from csd_ray.losses import get_loss

    n, d, v = (8192, 1536, 151936) if gpus else (256, 256, 151936)
    dtype = torch.bfloat16
    case = bench.Case(n, d, v, dtype, device=DEVICE)
    chunk = get_loss("csd").chunk_rows(v)
    case.grad_buffer(chunk, dtype), case.grad_buffer(1024, dtype)  # drawn outside the timings
    floor, _ = _timed(lambda: case.floor(chunk, dtype))
    print(f"[4] loss vs floor, N={n} d={d} V={v} bf16 on {DEVICE}, {chunk}-row chunks: floor (4 bare bf16 matmuls) {floor:.3f} s")
    for name in ("csd-TS", "csd-SS", "gjsd", "fkl"):
        reg, params = bench.LOSSES[name]
        secs, peak = _timed(lambda: case.fused(get_loss(reg, **params)))
        print(f"[4]   {name:7s} fused {secs:.3f} s, peak {_gib(peak)}, fused/floor time ratio {secs / floor:.2f}")
    big = 1024  # rows per chunk where a GPU has memory to spare: bigger GEMMs, fewer launches
    floor_big, _ = _timed(lambda: case.floor(big, dtype))
    secs, peak = _timed(lambda: case.fused(get_loss("csd", weights=("teacher", "student"), chunk_size=big)))
    print(f"[4]   csd-TS chunk_size={big}: fused {secs:.3f} s, peak {_gib(peak)}, floor {floor_big:.3f} s, "
          f"fused/floor time ratio {secs / floor_big:.2f}")
    liger_cls, why = _liger_jsd()
    if liger_cls is None:
        print(f"[4]   {why}")
        return
    ours = get_loss("gjsd", beta=0.5)
    labels = torch.where(case.mask, case.targets, torch.full_like(case.targets, -100))  # -100: Liger's ignore_index
    liger = liger_cls(jsd_beta=0.5, temperature=1.0)

    def liger_step():
        value = liger(case.h, case.w, case.teacher.hidden, case.teacher.lm_head, labels)
        value.backward()
        case.h.grad = case.w.grad = None
        return value.item()

    t_liger, peak_liger = _timed(liger_step)
    t_ours, peak_ours = _timed(lambda: case.fused(ours))
    gap = abs(liger_step() - case.fused(ours))
    print(f"[4]   Liger fused linear JSD(0.5) {t_liger:.3f} s (peak {_gib(peak_liger)}, {t_liger / floor:.2f}x floor); "
          f"csd_ray gjsd(0.5) {t_ours:.3f} s (peak {_gib(peak_ours)}); csd_ray/Liger time ratio {t_ours / t_liger:.2f}; "
          f"|loss difference| {gap:.2e}")


if __name__ == "__main__":
    sys.exit(main())
