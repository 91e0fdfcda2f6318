"""Ray actors: student sampler, teacher scorer, FSDP2 trainer ranks (plain classes; the
controller wraps them with ``ray.remote`` and the recipe's resources)."""
