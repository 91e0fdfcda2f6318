"""The logits contract: logits exactly as the model computes them, in one place.

Several families transform the lm_head output before the softmax: Gemma-2's
``final_logit_softcapping`` (z = c·tanh(x/c)), Granite's ``logits_scaling`` (z = x/s) and
Cohere's ``logit_scale`` (z = s·x). Everything that forms logits from hidden states itself (the
trainer's fused loss, the teacher's payloads, the trainer's probe, evaluation NLLs) goes through
``LogitTransform`` so that sampler, teacher and trainer see one distribution. A family with a
transform not listed here is refused: by its config before any actor starts
(``check_supported``), and by a forward-pass comparison when an actor loads it
(``verify_logits``), so a new quirk can never pass silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from csd_ray.models import ModelLoadError

#: Config attributes of transforms this module does not implement (family: attribute).
UNSUPPORTED = {"lm_head_multiplier": "Falcon-H1", "dim_model_base": "MiniCPM", "output_multiplier_scale": "muP models"}


class LogitTransformError(ModelLoadError):
    """A model forms its logits in a way csd_ray cannot reproduce; the message names the model."""


@dataclass(frozen=True)
class LogitTransform:
    """z = softcap(scale · x) where x = hidden @ lm_head.T; identity when scale=1 and softcap=None."""

    scale: float = 1.0
    """Multiplier of the raw lm_head output (Cohere logit_scale; 1/Granite logits_scaling)."""
    softcap: Optional[float] = None
    """c of z = c·tanh(x/c) (Gemma-2 final_logit_softcapping); None = no capping."""

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits from raw lm_head outputs ``x`` (any shape, same dtype)."""
        if self.scale != 1.0:
            x = x * self.scale
        if self.softcap is not None:
            x = torch.tanh(x / self.softcap) * self.softcap
        return x

    def derivative_from_output(self, z: torch.Tensor) -> Optional[torch.Tensor]:
        """dz/dx elementwise, computed from the output ``z`` (None: the constant ``scale``).

        softcap: d/dx c·tanh(s·x/c) = s·(1 − tanh²) = s·(1 − (z/c)²), so no input is kept."""
        if self.softcap is None:
            return None
        return self.scale * (1.0 - (z / self.softcap) ** 2)


def logit_transform(config) -> LogitTransform:
    """The transform a transformers config declares (text config of multimodal wrappers too)."""
    config = getattr(config, "text_config", None) or config
    scale = 1.0
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None):
        scale *= float(config.logit_scale)
    softcap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(scale, float(softcap) if softcap else None)


def check_supported(config, name: str) -> None:
    """Refuse, with one line, a config that declares a logit transform not implemented here."""
    config = getattr(config, "text_config", None) or config
    for attribute, family in UNSUPPORTED.items():
        value = getattr(config, attribute, None)
        if value not in (None, 1, 1.0):
            raise LogitTransformError(
                f"{name}: its config sets {attribute}={value!r} ({family}), a logit transform csd_ray does not "
                "reproduce; supported: final_logit_softcapping, logits_scaling, logit_scale")


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits ``[..., V]`` from final hidden states ``[..., d]`` (lm_head + transform)."""
    return logit_transform(model.config)(model.get_output_embeddings()(hidden))


@torch.no_grad()
def verify_logits(model, name: str, tokens: int = 6) -> None:
    """Compare the model's own forward logits with ``output_logits``; raise if they differ.

    Catches transforms that no config attribute announces (one short forward pass at load)."""
    device = next(model.parameters()).device
    ids = torch.arange(1, tokens + 1, device=device)[None]
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    mine = output_logits(model, hidden).float()
    theirs = model(input_ids=ids, use_cache=False).logits.float()
    relative = 1e-4 if model.dtype == torch.float32 else 2e-2
    error = float((mine - theirs).abs().max())
    if error > relative * max(1.0, float(theirs.abs().max())):
        raise LogitTransformError(
            f"{name}: logits formed from its hidden states differ from its forward pass by {error:.3g}; it applies "
            "a logit transform csd_ray does not reproduce (supported: final_logit_softcapping, logits_scaling, "
            "logit_scale)")
