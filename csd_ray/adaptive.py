"""DistiLLM's adaptive off-policy schedule: how often a step trains on student-generated outputs.

Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models" (ICML 2024),
Sec. 3.2 ("adaptive SGO scheduler"): training starts mostly off-policy (dataset or teacher
responses) and brings in student-generated outputs (SGOs) only when they are needed, measured by
the held-out loss. Each time a held-out evaluation's loss is worse than the reference (the last
value that triggered a rise, or the first one seen) by at least ``tolerance``, the chance φ that
a step draws the student source rises by ``increment``, capped at ``maximum``; the reference then
moves to that value. A rising held-out loss is the training-inference mismatch that on-policy
samples correct, and while it falls the cheaper off-policy responses keep being used.

The controller owns one schedule per stage that sets ``adaptive``; the schedule itself is pure
(no actors), and its state is saved with each checkpoint so a resumed run draws as the original.
"""

from __future__ import annotations

import math
from typing import Optional

from csd_ray.config import AdaptiveSourceConfig, SourceConfig


class AdaptiveSchedule:
    """φ for one stage: ``probability`` starts at the student source's configured probability.

    Args:
        config: the stage's ``adaptive`` settings.
        initial: φ₀, the student source's ``probability`` in the stage (in [0, maximum]).
        reference: the held-out metric before the stage starts (its last evaluation), or None.
    """

    def __init__(self, config: AdaptiveSourceConfig, initial: float, reference: Optional[float] = None) -> None:
        self.config = config
        self.probability = initial
        self.reference = reference

    def observe(self, value: Optional[float]) -> bool:
        """Take one held-out evaluation's ``config.metric``; True when φ rose.

        A missing or non-finite value changes nothing (an evaluation that could not score)."""
        if value is None or not math.isfinite(value):
            return False
        if self.reference is None:
            self.reference = value
            return False
        if value < self.reference + self.config.tolerance:
            return False
        self.probability = min(self.config.maximum, self.probability + self.config.increment)
        self.reference = value
        return True

    def weights(self, sources: list[SourceConfig]) -> list[float]:
        """Draw weights of ``sources``: φ for the student source, 1 − φ shared by the others in
        proportion to their configured probabilities (equally when those are all 0)."""
        others = [s.probability for s in sources if s.kind != "student"]
        total = sum(others)
        share = [p / total for p in others] if total > 0 else [1.0 / len(others)] * len(others)
        rest = iter(share)
        return [self.probability if s.kind == "student" else (1.0 - self.probability) * next(rest) for s in sources]

    def state(self) -> dict:
        """What a checkpoint keeps (JSON-able)."""
        return {"probability": self.probability, "reference": self.reference}

    def load_state(self, state: dict) -> None:
        self.probability, self.reference = state["probability"], state["reference"]
