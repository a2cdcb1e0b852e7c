"""Save and load models with their Spec: orbax-checkpoint arrays plus a JSON sidecar.

A checkpoint is a directory::

    DIR/variables/      the variable pytree, written by ``orbax.checkpoint.StandardCheckpointer``
    DIR/jfusion.json    {"format": ..., "version": 1, "spec": {path: axes} | null, "metadata": {...} | null}

The arrays round-trip bit-exactly (dtype and values; numpy leaves come back as numpy,
jax leaves as jax arrays). JSON has no tuples, so a Spec's views (nested tuples) are
written as lists and turned back into tuples on loading, which makes ``Spec`` equality hold.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import orbax.checkpoint as ocp

from jfusion.core.spec import Spec

FORMAT = "jfusion-checkpoint"
VERSION = 1
SIDECAR = "jfusion.json"
ARRAYS = "variables"


def _spec_to_json(spec: Spec) -> dict[str, list]:
    return {path: [list(e) if isinstance(e, tuple) else e for e in axes] for path, axes in spec.as_dict().items()}


def _spec_from_json(data: Mapping[str, list]) -> Spec:
    return Spec({path: tuple(tuple(e) if isinstance(e, list) else e for e in axes) for path, axes in data.items()})


def save_checkpoint(
    directory: str | os.PathLike,
    variables: Any,
    spec: Spec | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``variables`` (a pytree of arrays, e.g. linen variables), ``spec`` and ``metadata``.

    Args:
      directory: the checkpoint directory (created; relative paths are resolved, as orbax
        needs absolute ones).
      variables: the arrays to save, possibly nested and stacked along a model axis.
      spec: the Spec that labels ``variables``' leaves, stored as JSON.
      metadata: a JSON-able dict, e.g. the model's class name and constructor arguments.
      overwrite: replace an existing checkpoint at ``directory``. Only an empty directory or
        a jfusion checkpoint is ever deleted.

    Returns:
      The absolute checkpoint directory.
    """
    path = Path(directory).expanduser().resolve()
    try:
        sidecar = json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "spec": None if spec is None else _spec_to_json(spec),
                "metadata": None if metadata is None else dict(metadata),
            },
            indent=1,
            allow_nan=False,
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {err}") from err
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        is_checkpoint = (path / SIDECAR).is_file() or (path.is_dir() and not any(path.iterdir()))
        if not is_checkpoint:
            raise FileExistsError(
                f"{path} exists and is not a jfusion checkpoint (no {SIDECAR}); refusing to delete it "
                f"even with overwrite=True"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / ARRAYS, variables)
    # The sidecar is written last, so a directory with it holds a complete checkpoint.
    tmp = path / f".{SIDECAR}.tmp"
    tmp.write_text(sidecar)
    tmp.replace(path / SIDECAR)
    return path


def load_checkpoint(directory: str | os.PathLike) -> tuple[Any, Spec | None, dict[str, Any] | None]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(variables, spec, metadata)``."""
    path = Path(directory).expanduser().resolve()
    if not (path / SIDECAR).is_file():
        raise FileNotFoundError(f"{path} is not a jfusion checkpoint: it has no {SIDECAR}")
    sidecar = json.loads((path / SIDECAR).read_text())
    if sidecar.get("format") != FORMAT or sidecar.get("version") != VERSION:
        raise ValueError(
            f"{path / SIDECAR}: format {sidecar.get('format')!r} version {sidecar.get('version')!r}; "
            f"this jfusion reads {FORMAT!r} version {VERSION}"
        )
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(path / ARRAYS)
    spec = None if sidecar["spec"] is None else _spec_from_json(sidecar["spec"])
    return variables, spec, sidecar["metadata"]
