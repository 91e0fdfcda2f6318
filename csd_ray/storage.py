"""Shared-storage check: every trainer rank must see the driver's ``run.output_dir``.

Checkpoint shards are written by every trainer rank, while the ``COMPLETE`` marker and
``controller.json`` are written by the driver; on a multi-node cluster whose ``run.output_dir`` is
each node's own disk, a checkpoint would be split over several machines and resume would break
silently. So before training the driver writes a marker file with a random token there and each
rank reads it back, in its own process (same working directory and mounts as its checkpoint
writes).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from csd_ray.schema import ConfigError


def _read_marker(_actor, path: str) -> dict:
    """Runs inside a trainer rank (``__ray_call__``): what that process finds at ``path``."""
    import socket

    import ray

    try:
        text = Path(path).read_text()
    except OSError:
        text = None
    return {"text": text, "host": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
            "cwd": os.getcwd()}


def check_output_dir(run_dir: Path) -> None:
    """Raise ConfigError (key run.output_dir) when ``run_dir`` can never be a folder the driver
    writes: it, or the nearest part of it that exists, is a file, or that part is not writable.
    Runs before Ray starts (an existing file there used to stop the run with a traceback once the
    actors were up)."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == run_dir else f"cannot be made: {existing} is a file"
        raise ConfigError(f"'{run_dir}' {where}, not a folder; use another run.output_dir", key="run.output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"'{run_dir}' cannot be written: {existing} is not writable", key="run.output_dir")


def check_shared_output_dir(run_dir: Path, ranks: list) -> None:
    """Raise ConfigError (key run.output_dir) unless every actor in ``ranks`` reads the marker.

    ``run_dir`` must exist. The marker is removed afterwards. ``ranks`` are Ray actor handles.
    """
    import ray

    token = secrets.token_hex(8)
    marker = run_dir / f".shared-check-{token}"
    marker.write_text(token)
    try:
        seen = ray.get([rank.__ray_call__.remote(_read_marker, str(marker)) for rank in ranks])
    finally:
        marker.unlink(missing_ok=True)
    blind = [f"rank {i} on node {s['node_id'][:12]} ({s['host']}, cwd {s['cwd']})"
             for i, s in enumerate(seen) if s["text"] != token]
    if blind:
        raise ConfigError(
            f"'{run_dir}' is not one directory shared by the driver and every trainer: a file the driver wrote "
            f"there is missing for {', '.join(blind)}. Use an absolute path on storage every node mounts "
            "(EFS, Filestore, NFS; see clusters/README.md)", key="run.output_dir")
