"""Entry point: ``python -m csd_ray.run RECIPE.yaml [key.path=value ...] [--dry-run] [--debug]``.

With no cluster address it starts a local Ray on 127.0.0.1; under ``ray job submit`` (or with
RAY_ADDRESS set) it joins that cluster. Recipe problems are reported before any actor starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

# Quieter defaults only. Ray's authentication (RAY_AUTH_MODE) and binding are the cluster's to
# decide and are never set here; a local run binds 127.0.0.1 through ray.init (connect_ray).
for _key, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
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
        epilog=_recipe_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. run.steps=20 trainer.lr=1e-5 "
                        "stages.1.steps=50 'run.output_dir=runs/${run.name}'")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved recipe and placement plan, then exit")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser.parse_intermixed_args(argv)


def _recipe_help() -> str:
    """The recipe's sections (from the config docstrings) and how overrides address keys."""
    from csd_ray.schema import field_docs

    docs = field_docs(Recipe)
    lines = ["recipe sections (each key can be overridden as section.key=value):"]
    lines += [f"  {name:15s} {doc}" for name, doc in docs.items()]
    lines += [
        "",
        "overrides: values are YAML (trainer.lr=1e-5, sampler.placement.resources={node_a: 1}); a number",
        "indexes a list (stages.1.steps=50, batch.sources.0.probability=0.5); ${section.key} refers to",
        "another key (run.output_dir=runs/${run.name}; quote it in a shell).",
        "every key, its type, default and meaning: the 'Recipe reference' section of README.md",
        "(python scripts/recipe_reference.py prints it); --dry-run shows the resolved recipe.",
    ]
    return "\n".join(lines)


def connect_ray(recipe: Recipe) -> None:
    import ray
    from ray.job_config import JobConfig

    if ray.is_initialized():
        return
    # The run's name in the job's metadata (next to what `ray job submit --metadata-json` set).
    job_config = JobConfig(metadata={"csd_ray.run": recipe.run.name, "csd_ray.output_dir": recipe.run.output_dir})
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True, job_config=job_config)
    else:
        # A private single-machine Ray: every listener on loopback, no dashboard. Ray's own default
        # (token authentication for a new local cluster) applies unless RAY_AUTH_MODE says otherwise.
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", job_config=job_config)


def check_cluster(recipe: Recipe) -> None:
    """Stop before any actor starts when the plan can never be placed.

    Without an autoscaler the alive nodes are all there will be. With one (CSD_RAY_AUTOSCALING=1)
    the node types of ``run.cluster`` say what it can add; without that file nothing is checked.
    """
    from csd_ray.placement import live_node_types, node_types, nodes_needed, plan, total_demand

    live = not os.environ.get("CSD_RAY_AUTOSCALING")
    if not live:
        if not recipe.run.cluster:
            return
        types, where = node_types(recipe.run.cluster), f"the node types of {recipe.run.cluster}"
    else:
        types, where = live_node_types(), "this cluster's nodes (no autoscaler: set CSD_RAY_AUTOSCALING=1 if one will add nodes)"
    _, problems = nodes_needed(recipe, types)
    if problems:
        detail = ""
        if live:  # a live node's "type" is its id: say what the plan asks and what the nodes have
            demand = total_demand(plan(recipe))
            offer = "; ".join(f"node {name}: " + ", ".join(f"{k}={t['resources'].get(k, 0):g}" for k in demand)
                              for name, t in types.items())
            detail = (f" (the plan asks for {', '.join(f'{k}={v:g}' for k, v in demand.items())} in all, see --dry-run; "
                      f"{offer})")
        raise ConfigError(f"the recipe can never be placed on {where}: " + "; ".join(problems) + detail)


def _stop_on_signals(controller) -> None:
    """SIGTERM (preemption) or SIGINT: finish the current step, checkpoint, exit non-zero.

    A second signal exits at once (the last complete checkpoint still stands)."""
    import signal

    def handler(signum, frame):
        if controller.stop_requested:
            raise KeyboardInterrupt
        controller.stop_requested = signal.Signals(signum).name
        print(f"\n{controller.stop_requested} received: finishing this step, then checkpointing", file=sys.stderr)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


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
            if recipe.run.cluster:
                from csd_ray.placement import describe_cluster_fit

                text, problems = describe_cluster_fit(recipe, recipe.run.cluster)
                print(text)
                return 2 if problems else 0
            return 0
        from csd_ray.controller import Controller, RunStopped

        controller = Controller(recipe, log=lambda m: print(m, file=sys.stderr))
        controller.prepare()  # data, tokenizers, model paths, checkpoint: before Ray or any actor starts
        connect_ray(recipe)
        check_cluster(recipe)
        _stop_on_signals(controller)
        try:
            final = controller.run()
        except RunStopped as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        print(f"final student: {final}")
        return 0
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
