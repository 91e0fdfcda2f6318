"""Weight sync through the object store: pickled torch tensors vs HostWeights (numpy), one run.

The SmolLM2 8-layer student's state dict goes from the driver into Ray's object store and into a
receiving actor that loads it into its own copy of the model, as a sampler does after each
step. Each form is timed over several rounds (first dropped), median reported, ending with
`host_weights/torch sync time ratio: X.XXX`.

    python bench/weight_sync.py [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
import torch  # noqa: E402

from csd_ray.config import ModelConfig  # noqa: E402
from csd_ray.models import load_model  # noqa: E402
from csd_ray.weight_sync import HostWeights  # noqa: E402

STUDENT = ModelConfig(path="smollm2-135m-instruct", num_layers=8)


@ray.remote
class Receiver:
    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.model = load_model(STUDENT)

    def load(self, weights) -> None:
        state = weights.to_state_dict() if isinstance(weights, HostWeights) else weights
        self.model.load_state_dict(state, strict=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    state = {k: v.detach().clone() for k, v in load_model(STUDENT).state_dict().items() if k != "lm_head.weight"}
    receiver = Receiver.remote()
    ray.get(receiver.load.remote({}))
    forms = {"torch": lambda: state, "host_weights": lambda: HostWeights.from_state_dict(state)}
    seconds: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.rounds):
        for name, make in forms.items():  # interleaved: both see the same machine noise
            t0 = time.perf_counter()
            ref = ray.put(make())
            ray.get(receiver.load.remote(ref))
            seconds[name].append(time.perf_counter() - t0)
            del ref
    ray.shutdown()
    size = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
    print(f"state dict: {len(state)} tensors, {size:.0f} MiB; {args.rounds} rounds, first dropped, median")
    median = {name: statistics.median(s[1:]) for name, s in seconds.items()}
    for name, value in median.items():
        print(f"  {name:13s} put + get + load: {value:.3f} s")
    print(f"host_weights/torch sync time ratio: {median['host_weights'] / median['torch']:.3f}")


if __name__ == "__main__":
    main()
