"""Saved results: a JSON document of every number a command printed, and a bar chart of them.

``jfusion demo --out DIR`` and ``jfusion fuse --evaluate`` write their comparison as JSON
(:func:`write_json`) and, when matplotlib is installed, as a PNG bar chart
(:func:`write_chart`). The JSON holds ``"format": "jfusion-results"``, the command's
settings, the software versions (:func:`versions`) and the rows.

Files are written as checkpoints are (:mod:`jfusion.workflow.checkpoint`): into a temporary
sibling ``.NAME.jfusion-tmp-PID-RANDOM`` in the same directory, fsynced, then moved over the
target with :func:`os.replace`, so a reader sees the old file or the new one, never half of
one. And nothing jfusion did not write is replaced: an existing file is replaced only with
``overwrite=True``, and only if it is recognisably jfusion's (a JSON document of this
format, a PNG whose ``Software`` text says jfusion); anything else is refused, naming it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import secrets
import struct
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

FORMAT = "jfusion-results"
VERSION = 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, Any]:
    """What produced the numbers: python, jax, flax, ott-jax, jfusion (and more), the backend."""
    return {
        "python": platform.python_version(),
        "jfusion": _version("jfusion"),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "ott-jax": _version("ott-jax"),
        "optax": _version("optax"),
        "orbax-checkpoint": _version("orbax-checkpoint"),
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


# --- who wrote a file ---------------------------------------------------------------------


def _png_text(path: Path) -> dict[str, str]:
    """The tEXt chunks of a PNG file (empty if it is not one)."""
    texts: dict[str, str] = {}
    with open(path, "rb") as file:
        if file.read(8) != PNG_SIGNATURE:
            return texts
        while True:
            header = file.read(8)
            if len(header) < 8:
                return texts
            length, kind = struct.unpack(">I4s", header)
            body = file.read(length)
            file.read(4)  # CRC
            if kind == b"tEXt" and b"\0" in body:
                key, value = body.split(b"\0", 1)
                texts[key.decode("latin-1")] = value.decode("latin-1")
            elif kind == b"IEND":
                return texts


def written_by_jfusion(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a results file jfusion wrote: a JSON document of this format, or a
    PNG whose ``Software`` text starts with ``jfusion``. Directories and links never are."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    try:
        if path.suffix == ".json":
            document = json.loads(path.read_text(encoding="utf-8"))
            return isinstance(document, dict) and document.get("format") == FORMAT
        if path.suffix == ".png":
            return _png_text(path).get("Software", "").startswith("jfusion")
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return False


def check_writable(paths: Sequence[str | os.PathLike], overwrite: bool) -> None:
    """Raise FileExistsError unless every path is free, or (``overwrite``) a file jfusion wrote.

    Called before the work, so a command fails at once rather than after training; the
    writers check again.
    """
    for path in map(Path, paths):
        if not (path.exists() or path.is_symlink()):
            continue
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
        if not written_by_jfusion(path):
            raise FileExistsError(
                f"{path} exists and is not a results file jfusion wrote; refusing to replace it "
                f"even with --overwrite (move it, or write elsewhere)"
            )


def atomic_write(path: Path, write: Callable[[Any], None], overwrite: bool) -> Path:
    """``write(file)`` into a temporary file beside ``path``, then ``os.replace`` it onto ``path``
    (see the module docstring); ``path`` must be free or, with ``overwrite``, a file jfusion wrote."""
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    check_writable([path], overwrite)
    temporary = path.with_name(f".{path.name}.jfusion-tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


# --- the JSON document --------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.ndarray, jax.Array)):
        return _plain(np.asarray(value).tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no NaN or infinity
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def results_document(command: str, settings: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], **extra: Any) -> dict[str, Any]:
    """The JSON document of a command's results: format, command, settings, versions, rows."""
    return _plain(
        {
            "format": FORMAT,
            "version": VERSION,
            "command": command,
            "settings": dict(settings),
            "versions": versions(),
            **extra,
            "rows": list(rows),
        }
    )


def write_json(path: str | os.PathLike, document: Mapping[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``document`` as JSON to ``path`` atomically (see the module docstring)."""
    text = json.dumps(_plain(document), indent=1, allow_nan=False) + "\n"
    return atomic_write(Path(path), lambda file: file.write(text.encode("utf-8")), overwrite)


# --- the chart ----------------------------------------------------------------------------

# Bar colours by the kind of row.
COLOURS = {"parent": "#9e9e9e", "baseline": "#e07b39", "fused": "#3a76af"}


def write_chart(
    path: str | os.PathLike,
    bars: Sequence[tuple[str, float, str]],
    *,
    title: str,
    overwrite: bool = False,
) -> Path | None:
    """A horizontal bar chart of test accuracy, ``(label, accuracy in [0, 1], kind)`` per bar
    (kind: ``"parent"``, ``"baseline"`` or ``"fused"``), as a PNG at ``path``.

    Returns the path, or None when matplotlib is not installed (nothing is written).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        return None
    figure = Figure(figsize=(8.5, 0.42 * len(bars) + 1.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    labels = [label for label, _, _ in bars][::-1]
    values = [100 * accuracy for _, accuracy, _ in bars][::-1]
    colours = [COLOURS.get(kind, "#555555") for _, _, kind in bars][::-1]
    positions = np.arange(len(bars))
    axes.barh(positions, values, color=colours)
    for y, value in zip(positions, values):
        axes.text(value + 0.8, y, f"{value:.2f}%", va="center", fontsize=8)
    axes.set_yticks(positions, labels, fontsize=8)
    axes.set_xlim(0, 109)
    axes.set_xlabel("test accuracy (%)")
    axes.set_title(title, fontsize=9)
    kinds = [kind for kind in COLOURS if any(k == kind for _, _, k in bars)]
    axes.legend(handles=[Patch(color=COLOURS[k], label=k) for k in kinds], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return save_png(figure, path, overwrite)


def save_png(figure: Any, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a matplotlib figure as a PNG, atomically, marked as jfusion's (its ``Software``
    text), so a later ``overwrite=True`` may replace it and nothing else."""
    software = f"jfusion {_version('jfusion') or ''}".strip()
    return atomic_write(
        Path(path), lambda file: figure.savefig(file, format="png", dpi=110, metadata={"Software": software}), overwrite
    )


def has_matplotlib() -> bool:
    """Whether :func:`write_chart` can draw (matplotlib is importable)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
