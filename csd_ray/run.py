"""Entry point: ``python -m csd_ray.run RECIPE.yaml [key.path=value ...] [--dry-run] [--debug]``.

With no cluster address it starts a local Ray on 127.0.0.1; under ``ray job submit`` (or with
RAY_ADDRESS set) it joins that cluster. Recipe problems are reported before any actor starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

# Ray on this machine kind must bind loopback and must not phone home (DESIGN §6).
for _key, _value in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

from csd_ray.config import ConfigError, Recipe, load_recipe  # noqa: E402
from csd_ray.data import DataError  # noqa: E402
from csd_ray.models import ModelLoadError  # noqa: E402

USER_ERRORS = (ConfigError, DataError, ModelLoadError)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m csd_ray.run",
        description="On-policy distillation with Concrete Score Distillation on Ray.",
    )
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. run.steps=20 trainer.lr=1e-5")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved recipe and placement plan, then exit")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser.parse_intermixed_args(argv)


def connect_ray(recipe: Recipe) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")


def check_cluster(recipe: Recipe) -> None:
    import ray

    from csd_ray.placement import unsatisfiable

    autoscaling = bool(os.environ.get("CSD_RAY_AUTOSCALING"))
    problems = unsatisfiable(recipe, ray.cluster_resources(), autoscaling)
    if problems:
        raise ConfigError(
            "this cluster can never run the recipe: " + "; ".join(problems)
            + " (set CSD_RAY_AUTOSCALING=1 if an autoscaler will add nodes)"
        )


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.dry_run:
            import yaml

            from csd_ray.placement import describe
            from csd_ray.schema import to_dict

            print(yaml.safe_dump(to_dict(recipe), sort_keys=False), end="")
            print(describe(recipe))
            return 0
        connect_ray(recipe)
        check_cluster(recipe)
        from csd_ray.controller import Controller

        final = Controller(recipe, log=lambda m: print(m, file=sys.stderr)).run()
        print(f"final student: {final}")
        return 0
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
