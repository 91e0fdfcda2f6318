"""final/: the student's dtype, readable files, the source model's generation config, Hub upload (issue 14).

A real run on a local Ray exports the student; only the Hub API (HfApi) is replaced, by a recorder.
"""

import json
import shutil
import stat

import pytest
import torch

from conftest import smoke_recipe
from csd_ray.controller import Controller, RunStopped


@pytest.fixture
def student_folder(tmp_path):
    """The smoke student as an HF folder whose generation_config.json is the source model's own."""
    from transformers import GenerationConfig

    from csd_ray.models import model_folder

    cfg = smoke_recipe(tmp_path).student_model
    folder = tmp_path / "student"
    shutil.copytree(model_folder(cfg), folder)
    GenerationConfig(eos_token_id=[2, 7], bos_token_id=1, temperature=0.6, top_p=0.9, do_sample=True,
                     max_new_tokens=77).save_pretrained(folder)
    return folder


class HubRecorder:
    """Stands in for huggingface_hub.HfApi (the network boundary) and records what it was asked."""

    calls: list = []
    fail: bool = False

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail:
            raise PermissionError("401 Client Error: Unauthorized (invalid token)")
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in __import__("pathlib").Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "files": files}))


def test_final_is_a_readable_hf_folder_in_the_students_dtype_and_is_pushed(ray_session, tmp_path, student_folder,
                                                                            monkeypatch):
    import huggingface_hub
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GenerationConfig

    monkeypatch.setattr(huggingface_hub, "HfApi", HubRecorder)
    HubRecorder.calls = []
    out = tmp_path / "run"
    recipe = smoke_recipe(out, "run.steps=1", f"student_model.path={student_folder}", "student_model.dtype=bfloat16",
                          "run.push_to_hub=me/csd-student")
    final = Controller(recipe, log=lambda m: None).run()

    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(final)
    assert next(model.parameters()).dtype == torch.bfloat16
    # the source model's generation config, not one regenerated from config.json
    gen = GenerationConfig.from_pretrained(final)
    assert (gen.eos_token_id, gen.temperature, gen.top_p, gen.max_new_tokens) == ([2, 7], 0.6, 0.9, 77)
    # readable by everyone who can reach the shared folder
    for path in final.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, (path.name, oct(path.stat().st_mode))
    assert stat.S_IMODE(final.stat().st_mode) == 0o755

    (create, upload) = HubRecorder.calls
    assert create == ("create_repo", "me/csd-student", {"repo_type": "model", "private": True, "exist_ok": True})
    assert upload[1] == "me/csd-student" and upload[2]["folder_path"] == str(final)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(upload[2]["files"])


def test_export_dtype_overrides_and_a_failed_upload_stops_with_the_folder_kept(ray_session, tmp_path, monkeypatch):
    import huggingface_hub
    from safetensors import safe_open

    monkeypatch.setattr(huggingface_hub, "HfApi", HubRecorder)
    HubRecorder.calls, HubRecorder.fail = [], True
    try:
        out = tmp_path / "run"
        recipe = smoke_recipe(out, "run.steps=1", "student_model.dtype=bfloat16", "run.export_dtype=float32",
                              "run.push_to_hub=me/csd-student")
        with pytest.raises(RunStopped, match=r"upload to me/csd-student failed: 401 .*the student is in") as err:
            Controller(recipe, log=lambda m: None).run()
    finally:
        HubRecorder.fail = False
    assert err.value.exit_code == 5
    with safe_open(str(out / "final" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
