"""Save and load models with their Spec: orbax-checkpoint arrays plus a JSON sidecar.

A checkpoint is a directory of two entries::

    DIR/variables/      the variable pytree, written by ``orbax.checkpoint.StandardCheckpointer``
    DIR/jfusion.json    the sidecar: one JSON object, format version 2

    {"format": "jfusion-checkpoint", "version": 2,
     "spec": {path: axes} | null,
     "metadata": {...} | null,
     "arrays": [{"path": "params/Dense_0/kernel", "dtype": "float32", "shape": [64, 16],
                 "sha256": HEX}, ...],
     "sha256": HEX}

``arrays`` has one record per leaf, in flattening order: its path (every key, joined by "/"),
dtype, shape and the sha256 of its bytes (C order, little endian). The last ``sha256`` digests
the other fields as canonical JSON (sorted keys, no spaces, ASCII), so it covers the spec, the
metadata and every record.

Guarantees:

* Round trips are bit-exact, and checked: :func:`load_checkpoint` recomputes every leaf's
  digest and raises :class:`CheckpointError` naming the checkpoint and the first leaf (in
  saving order) whose dtype, shape or bytes differ, or naming the sidecar when it is not what
  was written. numpy leaves come back as numpy, jax leaves as jax arrays; orbax gives every
  container back as a dict or a list (a tuple becomes a list), so leaves are matched by path,
  not by position. JSON has no tuples, so a Spec's views (nested tuples) are written as lists
  and turned back into tuples on loading, and :class:`jfusion.Heads` and
  :class:`jfusion.Concat` as ``{"heads": name, "count": H}`` and ``{"concat": [block, ...]}``,
  which makes ``Spec`` equality hold.
* A save never leaves DIR half-written. :func:`save_checkpoint` writes the new checkpoint into
  a sibling ``.NAME.jfusion-tmp-PID-RANDOM`` (NAME is DIR's name), fsyncs it, renames the old
  checkpoint to ``.NAME.jfusion-old-PID-RANDOM`` and the new one to DIR, then deletes the old
  one. A process killed between the two renames leaves DIR missing and both complete
  checkpoints beside it; the next load or save of DIR puts the new one in place first, so
  through this module DIR always reads as the complete old or the complete new checkpoint.
  The next save also deletes the siblings left by saves whose process (PID, on this machine)
  is no longer running.
* Nothing jfusion did not write is deleted. ``overwrite=True`` replaces only an empty
  directory or a checkpoint holding nothing but its sidecar, ``variables/`` and the temporary
  files of jfusion and orbax; any other entry makes it refuse, naming the entry. Siblings are
  deleted the same way: entries that jfusion and orbax did not write are kept, with a warning.
* A damaged checkpoint (a sidecar that is not JSON, lacks a field or has one of the wrong type;
  missing or unreadable array files) raises :class:`CheckpointError` naming the file and what
  was expected.
* Version 1 checkpoints (written before the digests) still load, unverified; saving always
  writes version 2.

One process at a time may save a given DIR.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import textwrap
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from jfusion.core.errors import JFusionError
from jfusion.core.spec import Concat, Heads, Spec

FORMAT = "jfusion-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
SIDECAR = "jfusion.json"
ARRAYS = "variables"
# The sidecar is written under this name and renamed, so a sidecar that exists is complete.
# (Version 1 used the same name inside DIR.)
SIDECAR_PARTIAL = f".{SIDECAR}.tmp"
# orbax writes ``variables`` as ``variables.orbax-checkpoint-tmp[-TIMESTAMP]`` and renames it.
ORBAX_PARTIAL_PREFIX = f"{ARRAYS}.orbax-checkpoint-tmp"


class CheckpointError(JFusionError):
    """A checkpoint that cannot be read as written: a malformed sidecar, damaged or missing arrays."""


# --- the arrays' digests ---------------------------------------------------------------


def _key_name(key: Any) -> str:
    # Every key, named as orbax names it when it turns containers into dicts and lists, so a
    # restored tree names each leaf as the saved one did (jfusion.core.tree drops nnx's
    # ``.value``; orbax keeps it as a dict key).
    for attribute in ("key", "name", "idx"):  # DictKey/FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _leaf_record(path: str, leaf: Any) -> dict[str, Any]:
    """``{"path", "dtype", "shape", "sha256"}`` of one leaf; the digest is of its C-order,
    little-endian bytes, so it does not depend on the memory layout it was saved from."""
    array = np.asarray(leaf)
    canonical = array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)
    digest = hashlib.sha256(canonical.reshape(-1).view(np.uint8)).hexdigest()
    return {"path": path, "dtype": str(canonical.dtype), "shape": list(array.shape), "sha256": digest}


def _leaf_records(variables: Any) -> list[dict[str, Any]]:
    """Every leaf's record, in flattening order."""
    with_paths, _ = jax.tree_util.tree_flatten_with_path(variables)
    return [_leaf_record("/".join(map(_key_name, keys)), leaf) for keys, leaf in with_paths]


def _describe(record: Mapping[str, Any]) -> str:
    shape = ",".join(map(str, record["shape"]))
    return f"{record['dtype']}[{shape}] with sha256 {record['sha256'][:16]}..."


def _verify_arrays(arrays_dir: Path, expected: Sequence[Mapping[str, Any]], variables: Any) -> None:
    """Raise CheckpointError unless ``variables`` are the leaves ``expected`` records."""
    found = {record["path"]: record for record in _leaf_records(variables)}
    missing = [r["path"] for r in expected if r["path"] not in found]
    extra = sorted(set(found) - {r["path"] for r in expected})
    if missing or extra:
        raise CheckpointError(
            f"{arrays_dir}: the arrays are not the leaves {SIDECAR} lists: "
            f"missing {missing or 'none'}, unlisted {extra or 'none'}"
        )
    for record in expected:  # in saving order, so the first difference named is the first saved
        actual = found[record["path"]]
        if [actual[k] for k in ("dtype", "shape", "sha256")] != [record[k] for k in ("dtype", "shape", "sha256")]:
            raise CheckpointError(
                f"{arrays_dir}: leaf {record['path']} is not what was saved: expected "
                f"{_describe(record)}, found {_describe(actual)}; the array files are damaged"
            )


# --- the sidecar -------------------------------------------------------------------------


def _entry_to_json(entry: Any) -> Any:
    """An axis entry as JSON: a view is a list, ``Heads`` and ``Concat`` are tagged objects."""
    if isinstance(entry, Heads):
        return {"heads": entry.name, "count": entry.count}
    if isinstance(entry, Concat):
        return {"concat": [_entry_to_json(block) for block in entry.blocks]}
    if isinstance(entry, (tuple, list)):
        return [_entry_to_json(d) for d in entry]
    return entry


def _entry_from_json(entry: Any) -> Any:
    if isinstance(entry, dict) and set(entry) == {"heads", "count"}:
        return Heads(entry["heads"], entry["count"])
    if isinstance(entry, dict) and set(entry) == {"concat"} and isinstance(entry["concat"], list):
        return Concat(*map(_entry_from_json, entry["concat"]))
    if isinstance(entry, dict):
        raise TypeError(f"an axis entry object must be {{'heads', 'count'}} or {{'concat'}}, not {sorted(entry)}")
    if isinstance(entry, list):
        return tuple(map(_entry_from_json, entry))
    return entry


def _spec_to_json(spec: Spec) -> dict[str, list]:
    return {path: [_entry_to_json(e) for e in axes] for path, axes in spec.as_dict().items()}


def _digest(document: Mapping[str, Any]) -> str:
    """The sha256 of ``document`` without its ``sha256`` field, as canonical JSON."""
    body = {k: v for k, v in document.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sidecar_text(spec: Spec | None, metadata: Mapping[str, Any] | None, records: list[dict[str, Any]]) -> str:
    try:
        document = {
            "format": FORMAT,
            "version": VERSION,
            "spec": None if spec is None else _spec_to_json(spec),
            "metadata": None if metadata is None else dict(metadata),
            "arrays": records,
        }
        # Digest what loading will parse (JSON turns tuples into lists, int keys into strings).
        document = json.loads(json.dumps(document, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {err}") from err
    return json.dumps({**document, "sha256": _digest(document)}, indent=1)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(type(n) is int and n >= 0 for n in value)


# What each field of an array record must be: (check, what the error says was expected).
RECORD_FIELDS = {
    "path": (lambda v: isinstance(v, str), "a string"),
    "dtype": (lambda v: isinstance(v, str), "a string"),
    "shape": (_is_shape, "a list of non-negative ints"),
    "sha256": (_is_sha256, "64 lowercase hex digits"),
}


def _malformed(file: Path, field: str, expected: str, found: Any) -> CheckpointError:
    return CheckpointError(
        f"{file}: malformed sidecar: {field} must be {expected}, found {textwrap.shorten(repr(found), 80)}"
    )


def _check_fields(file: Path, document: Mapping[str, Any]) -> None:
    """Raise CheckpointError unless ``document`` (of a readable version) has every field its
    version needs, of the right type."""
    for key in ("spec", "metadata"):
        if key not in document:
            raise CheckpointError(f"{file}: malformed sidecar: no {key!r} field")
        if not (document[key] is None or isinstance(document[key], dict)):
            raise _malformed(file, repr(key), "an object or null", document[key])
    if document["version"] == 1:
        return
    for key in ("arrays", "sha256"):
        if key not in document:
            raise CheckpointError(f"{file}: malformed sidecar: no {key!r} field")
    if not isinstance(document["arrays"], list):
        raise _malformed(file, "'arrays'", "a list", document["arrays"])
    for i, record in enumerate(document["arrays"]):
        if not isinstance(record, dict):
            raise _malformed(file, f"'arrays'[{i}]", "an object", record)
        for key, (check, expected) in RECORD_FIELDS.items():
            if key not in record:
                raise CheckpointError(f"{file}: malformed sidecar: 'arrays'[{i}] has no {key!r}")
            if not check(record[key]):
                raise _malformed(file, f"'arrays'[{i}][{key!r}]", expected, record[key])
    if not _is_sha256(document["sha256"]):
        raise _malformed(file, "'sha256'", "64 lowercase hex digits", document["sha256"])


def _read_sidecar(file: Path) -> dict[str, Any]:
    """The sidecar's fields, checked: a JSON object of a readable format and version whose
    fields have the right types and, from version 2, whose digest matches."""
    try:
        document = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{file}: malformed sidecar: not UTF-8 text ({err})") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: malformed sidecar: not valid JSON ({err})") from err
    if not isinstance(document, dict):
        raise _malformed(file, "the document", "a JSON object", document)
    version = document.get("version")
    if document.get("format") != FORMAT or type(version) is not int or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{file}: format {document.get('format')!r} version {document.get('version')!r}; "
            f"this jfusion reads {FORMAT!r} versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    _check_fields(file, document)
    if document["version"] >= 2 and _digest(document) != document["sha256"]:
        raise CheckpointError(
            f"{file}: the sidecar is damaged: its contents do not match its sha256 "
            f"(expected {document['sha256'][:16]}..., found {_digest(document)[:16]}...)"
        )
    return document


def _spec_from_json(file: Path, data: Mapping[str, Any]) -> Spec:
    for path, axes in data.items():
        if not isinstance(axes, list):  # a string would pass as a sequence of one-letter groups
            raise _malformed(file, f"'spec'[{path!r}]", "a list of axis entries", axes)
    try:
        return Spec({p: tuple(map(_entry_from_json, axes)) for p, axes in data.items()})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: malformed sidecar: its spec is invalid: {err}") from err


# --- directories -------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (orbax does not promise durability)."""
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync(Path(directory, name))
        _fsync(Path(directory))


def _is_own_entry(name: str) -> bool:
    """Whether a checkpoint directory's entry ``name`` is one jfusion or orbax writes."""
    return name in (SIDECAR, SIDECAR_PARTIAL, ARRAYS) or name.startswith(ORBAX_PARTIAL_PREFIX)


def _remove_checkpoint(directory: Path) -> list[str]:
    """Delete what jfusion and orbax wrote in ``directory``, then the directory if that emptied
    it; returns the entries left (written by someone else, so kept)."""
    # The sidecar goes first: a directory with a sidecar is then always complete.
    (directory / SIDECAR).unlink(missing_ok=True)
    for name in sorted(os.listdir(directory)):
        entry = directory / name
        if not _is_own_entry(name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    left = sorted(os.listdir(directory))
    if not left:
        directory.rmdir()
    return left


def _sibling_pattern(path: Path) -> re.Pattern:
    """``.NAME.jfusion-(tmp|old)-PID-RANDOM``: the siblings a save of ``path`` creates."""
    return re.compile(rf"\.{re.escape(path.name)}\.jfusion-(tmp|old)-(\d+)-([0-9a-f]{{8}})")


def _sibling(path: Path, kind: str, token: str) -> Path:
    return path.with_name(f".{path.name}.jfusion-{kind}-{token}")


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _abandoned_siblings(path: Path) -> list[tuple[str, str, Path]]:
    """``(kind, token, sibling)`` of every sibling of ``path`` whose save is no longer running,
    sorted by name."""
    pattern = _sibling_pattern(path)
    found = []
    for name in sorted(os.listdir(path.parent)):
        match = pattern.fullmatch(name)
        if match and not _is_running(int(match[2])):
            found.append((match[1], f"{match[2]}-{match[3]}", path.parent / name))
    return found


def _is_complete(directory: Path) -> bool:
    # Sidecar last when writing, first when deleting: its presence means the arrays are whole.
    return (directory / SIDECAR).is_file() and (directory / ARRAYS).is_dir()


def _recover(path: Path) -> None:
    """If a killed save left ``path`` missing between its two renames, finish the swap: put
    the new checkpoint in place if it is complete, else the old one."""
    if path.exists() or not path.parent.is_dir():
        return
    olds = [(token, sibling) for kind, token, sibling in _abandoned_siblings(path) if kind == "old"]
    if len(olds) > 1:  # one save at a time leaves at most one
        raise CheckpointError(
            f"{path} is missing and several interrupted saves left old checkpoints beside it: "
            f"{', '.join(str(s) for _, s in olds)}; rename the one to keep to {path}"
        )
    if olds:
        token, old = olds[0]
        for candidate in (_sibling(path, "tmp", token), old):
            if _is_complete(candidate):
                os.rename(candidate, path)
                _fsync(path.parent)
                return


def _remove_abandoned(path: Path) -> None:
    """Delete the siblings of ``path`` that saves no longer running left (never ``path``)."""
    for _, _, sibling in _abandoned_siblings(path):
        left = _remove_checkpoint(sibling)
        if left:
            warnings.warn(f"kept {sibling}: it holds {', '.join(left)}, which jfusion did not write")


def _check_replaceable(path: Path) -> None:
    """Raise FileExistsError unless ``path`` is an empty directory or a checkpoint holding
    nothing but what jfusion and orbax write."""
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory; refusing to replace it")
    entries = sorted(os.listdir(path))
    if entries and SIDECAR not in entries:
        # Without the sidecar nothing shows that jfusion wrote the rest, even under our names.
        interrupted = all(map(_is_own_entry, entries))
        raise FileExistsError(
            f"{path} exists and is not a jfusion checkpoint (no {SIDECAR}); refusing to delete it "
            f"even with overwrite=True"
            + ("; it looks like a save that jfusion 1 left unfinished: delete it by hand" if interrupted else "")
        )
    foreign = [name for name in entries if not _is_own_entry(name) or (path / name).is_symlink()]
    if foreign:
        raise FileExistsError(
            f"{path} holds files a jfusion checkpoint does not: {', '.join(foreign)}; refusing to "
            f"delete them even with overwrite=True (move them out, or save elsewhere)"
        )


def _write(directory: Path, variables: Any, sidecar: str) -> None:
    """Write a complete, fsynced checkpoint into the new directory ``directory``."""
    directory.mkdir()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / ARRAYS, variables)
    _fsync_tree(directory / ARRAYS)
    partial = directory / SIDECAR_PARTIAL
    with open(partial, "w", encoding="utf-8") as file:
        file.write(sidecar)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, directory / SIDECAR)
    _fsync(directory)


def _swap_in(new: Path, path: Path, old: Path) -> bool:
    """Rename ``new`` to ``path``, moving an existing ``path`` to ``old`` first; returns whether
    there was one. Only between the two renames is ``path`` missing (see :func:`_recover`)."""
    replacing = path.exists()
    if replacing:
        os.rename(path, old)
        try:
            os.rename(new, path)
        except BaseException:
            os.rename(old, path)
            raise
    else:
        os.rename(new, path)
    _fsync(path.parent)
    return replacing


def save_checkpoint(
    directory: str | os.PathLike,
    variables: Any,
    spec: Spec | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``variables`` (a pytree of arrays, e.g. linen variables), ``spec`` and ``metadata``.

    When this returns, ``directory`` holds the new checkpoint; if it raises or the process
    dies, ``directory`` reads as the complete old or the complete new one (module docstring).

    Args:
      directory: the checkpoint directory (created, with its parents; relative paths are
        resolved, as orbax needs absolute ones).
      variables: the arrays to save, possibly nested and stacked along a model axis.
      spec: the Spec that labels ``variables``' leaves, stored as JSON.
      metadata: a JSON-able dict, e.g. the model's class name and constructor arguments.
      overwrite: replace an existing checkpoint at ``directory``. Only an empty directory or
        a checkpoint holding nothing that jfusion did not write is ever replaced.

    Returns:
      The absolute checkpoint directory.

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is False, or it holds something
        that is not jfusion's.
      ValueError: ``variables`` has no leaves, or ``metadata`` is not JSON-serialisable
        (checked before anything is written).
    """
    path = Path(directory).expanduser().resolve()
    records = _leaf_records(variables)
    if not records:  # orbax refuses too, but only once it has started writing
        raise ValueError("variables has no arrays to save")
    sidecar = _sidecar_text(spec, metadata, records)
    path.parent.mkdir(parents=True, exist_ok=True)
    _recover(path)
    _remove_abandoned(path)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
        _check_replaceable(path)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    new, old = _sibling(path, "tmp", token), _sibling(path, "old", token)
    try:
        _write(new, variables, sidecar)
        replaced = _swap_in(new, path, old)
    except BaseException:
        if new.exists():
            _remove_checkpoint(new)
        raise
    if replaced:
        left = _remove_checkpoint(old)
        if left:  # put there during the save
            warnings.warn(
                f"kept {old}, the replaced checkpoint: it holds {', '.join(left)}, which jfusion did not write"
            )
    return path


def _error_summary(err: BaseException) -> str:
    # tensorstore's messages append a page-long JSON spec of the store; the first line says why.
    lines = str(err).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec=")[0] if lines else ""
    return f"{type(err).__name__}: {textwrap.shorten(text, 300, placeholder=' ...')}"


def _restore(arrays_dir: Path) -> Any:
    if not arrays_dir.is_dir():
        raise CheckpointError(f"{arrays_dir}: missing; the checkpoint has a {SIDECAR} but no arrays")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(arrays_dir)
    # orbax reports damaged files as whatever its parsers raise: ValueError and
    # JSONDecodeError (tensorstore, metadata), KeyError, FileNotFoundError, plain Exception.
    except Exception as err:
        raise CheckpointError(f"{arrays_dir}: the array files are damaged ({_error_summary(err)})") from err


def load_checkpoint(directory: str | os.PathLike) -> tuple[Any, Spec | None, dict[str, Any] | None]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(variables, spec, metadata)``.

    The arrays are verified against the sidecar's digests (version 2), and a save that was
    killed between its renames is completed first.

    Raises:
      FileNotFoundError: ``directory`` does not exist, or holds no sidecar.
      NotADirectoryError: ``directory`` is a file.
      CheckpointError: the sidecar or the arrays are damaged, or of an unknown format.
    """
    path = Path(directory).expanduser().resolve()
    _recover(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a checkpoint directory: it is a file")
    if not (path / SIDECAR).is_file():
        raise FileNotFoundError(f"{path} is not a jfusion checkpoint: it has no {SIDECAR}")
    document = _read_sidecar(path / SIDECAR)
    spec = None if document["spec"] is None else _spec_from_json(path / SIDECAR, document["spec"])
    variables = _restore(path / ARRAYS)
    if document["version"] >= 2:
        _verify_arrays(path / ARRAYS, document["arrays"], variables)
    return variables, spec, document["metadata"]
