"""The trained student as a normal HF folder (output_dir/final), and its optional Hub upload."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from csd_ray.config import Recipe


def export_dtype(recipe: Recipe) -> torch.dtype:
    """run.export_dtype, with 'auto' meaning the student's own dtype (student_model.dtype)."""
    name = recipe.run.export_dtype if recipe.run.export_dtype != "auto" else recipe.student_model.dtype
    return getattr(torch, name)


def export_hf_folder(clean, trained, tokenizer, path: str, recipe: Recipe) -> None:
    """Write ``clean`` (a full, unsharded copy of ``trained``) as an HF folder at ``path``.

    - weights cast to ``export_dtype(recipe)`` (fp32 master weights would double the size);
    - ``generation_config.json`` is the one the student was loaded with (the source model's eos
      list, sampling defaults), not one regenerated from the model config;
    - files 0644 and folders 0755 whatever the process umask or the writer's temp-file mode, so
      other users of shared storage (and a vLLM server) can read them.
    """
    clean.to(export_dtype(recipe))
    clean.config.dtype = export_dtype(recipe)
    clean.generation_config = trained.generation_config
    clean.save_pretrained(path)
    tokenizer.save_pretrained(path)
    os.chmod(path, 0o755)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


def push_to_hub(folder: Path, recipe: Recipe, log=print) -> str:
    """Upload ``folder`` to the Hub repo ``run.push_to_hub`` (created if missing); returns its URL.

    Raises huggingface_hub's errors as they come (no token, no permission): the folder stays on
    disk and the message says so."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo = recipe.run.push_to_hub
    url = api.create_repo(repo, repo_type="model", private=recipe.run.hub_private, exist_ok=True)
    api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(folder),
                      commit_message=f"csd_ray run {recipe.run.name}: {recipe.run.steps} steps")
    log(f"uploaded {folder} to {url}")
    return str(url)
