"""Image-classification datasets as numpy arrays, and the data splits of fusion experiments.

Images are float32 in ``[0, 1]`` with shape ``(N, H, W, C)``; labels are int32 class ids.

* ``"digits"``: scikit-learn's bundled 8x8 digits (no download), split 75/25 per class.
* ``"fashion_mnist"``: the original IDX files (Debian's ``dataset-fashion-mnist``).
* ``"mnist"``, ``"cifar10"``, ``"cifar100"``: TensorFlow Datasets' random-access
  ``tfds.data_source`` (which needs no TensorFlow).

Splits reproduce the heterogeneous-data setups of fusion papers: OTFusion's skill transfer
(:func:`special_class_split`), its four models on unequal shares (:func:`proportion_split`)
and federated learning's Dirichlet non-iid clients (:func:`dirichlet_split`). All are pure
functions of the label array and a seed, and return index arrays into it.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from jfusion.core.errors import JFusionError

DATASETS = ("digits", "fashion_mnist", "mnist", "cifar10", "cifar100")

# Where system packages put datasets (Debian's dataset-* packages use /usr/share/datasets).
# Searched after ``data_dir`` and ``$JFUSION_DATA``; pass ``system_dirs=()`` to skip them.
SYSTEM_DATA_DIRS: tuple[str, ...] = ("/usr/share/datasets",)

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_DATA_EXTRA = "pip install 'jfusion[data]'"


class DatasetUnavailableError(JFusionError):
    """A dataset's files or its loader are not on this machine; the message says how to get them."""


class CorruptDatasetError(DatasetUnavailableError):
    """A dataset file exists but cannot be parsed (truncated download, wrong file)."""


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetSplits:
    """A dataset's train and test splits (images float32 in [0, 1], ``(N, H, W, C)``; labels int32)."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int

    def __repr__(self) -> str:
        return (
            f"DatasetSplits(name={self.name!r}, train={self.train_images.shape}, "
            f"test={self.test_images.shape}, num_classes={self.num_classes})"
        )


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    system_dirs: Sequence[str | os.PathLike] = SYSTEM_DATA_DIRS,
) -> DatasetSplits:
    """Load one of :data:`DATASETS` as numpy arrays.

    Args:
      name: ``"digits"``, ``"fashion_mnist"``, ``"mnist"``, ``"cifar10"`` or ``"cifar100"``
        (``-`` may stand for ``_``).
      data_dir: for Fashion-MNIST a directory holding the IDX files (or a ``fashion-mnist``
        folder of them), searched before ``$JFUSION_DATA`` and ``system_dirs``; for the TFDS
        datasets, TFDS's data directory (TFDS's default, ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``, when None). Unused for digits.
      download: let TFDS download and prepare a dataset it does not find (needs internet).
      system_dirs: system dataset directories searched last for Fashion-MNIST.

    Raises:
      DatasetUnavailableError: the data or its loader is missing; the message names the
        command that installs it.
    """
    key = name.replace("-", "_").lower()
    if key == "digits":
        return _load_digits()
    if key == "fashion_mnist":
        return _load_fashion_mnist(data_dir, system_dirs)
    if key in ("mnist", "cifar10", "cifar100"):
        return _load_tfds(key, data_dir, download)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


# --- digits -----------------------------------------------------------------------------


def _load_digits(test_fraction: float = 0.25, seed: int = 0) -> DatasetSplits:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DatasetUnavailableError(
            f"the digits dataset ships with scikit-learn, which is not installed: {_DATA_EXTRA}"
        ) from err
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[..., None]  # pixel values are 0..16
    labels = bunch.target.astype(np.int32)
    train, test = _stratified_split(labels, test_fraction, seed)
    return DatasetSplits("digits", images[train], labels[train], images[test], labels[test], 10)


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Per class, so both halves keep the class balance whatever the seed.
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# --- Fashion-MNIST (IDX files) ------------------------------------------------------------

# IDX type codes (the third magic byte) and the big-endian dtypes they denote.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike, *, ndim: int | None = None) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzipped (``.gz``) or not.

    Layout: a magic number ``00 00 TT DD`` (``TT`` the element type, ``DD`` the number of
    dimensions), ``DD`` big-endian uint32 sizes, then the elements in C order.

    Args:
      path: the file.
      ndim: the number of dimensions the caller expects (3 for images, 1 for labels).

    Raises:
      CorruptDatasetError: bad magic number, unexpected dimensions, or a size that does
        not match the data (e.g. a truncated download).
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise CorruptDatasetError(f"{path}: cannot be read as {'gzip' if path.suffix == '.gz' else 'IDX'}: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CorruptDatasetError(
            f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}; expected "
            f"00 00 then a type code in {[hex(t) for t in _IDX_DTYPES]}, then the dimension count)"
        )
    dtype, dims = _IDX_DTYPES[raw[2]], raw[3]
    if ndim is not None and dims != ndim:
        raise CorruptDatasetError(f"{path}: IDX file has {dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise CorruptDatasetError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=dims, offset=4))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise CorruptDatasetError(
            f"{path}: IDX header says shape {shape} ({expected} bytes in all) but the file has "
            f"{len(raw)} bytes; the file is truncated or corrupt, download it again"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def _idx_file(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_dirs(data_dir, system_dirs) -> list[Path]:
    bases = [data_dir, os.environ.get("JFUSION_DATA") or None]
    dirs = [d for base in bases if base is not None for d in (Path(base), Path(base) / "fashion-mnist")]
    dirs += [Path(base) / "fashion-mnist" for base in system_dirs]
    return dirs


def _load_fashion_mnist(data_dir, system_dirs) -> DatasetSplits:
    searched = _fashion_mnist_dirs(data_dir, system_dirs)
    for directory in searched:
        files = {key: _idx_file(directory, stem) for key, stem in FASHION_MNIST_FILES.items()}
        if all(files.values()):
            break
    else:
        raise DatasetUnavailableError(
            f"Fashion-MNIST IDX files ({', '.join(FASHION_MNIST_FILES.values())}, gzipped or not) "
            f"were not found in {[str(d) for d in searched]}. Install them with "
            f"`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, into "
            f"/usr/share/datasets/fashion-mnist), or put them in a directory and pass "
            f"data_dir=... or set $JFUSION_DATA"
        )
    arrays = {key: read_idx(path, ndim=3 if key.endswith("images") else 1) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise CorruptDatasetError(
                f"Fashion-MNIST {split} split in {directory}: {len(images)} images but "
                f"{len(labels)} labels"
            )
    return DatasetSplits(
        "fashion_mnist",
        _unit_images(arrays["train_images"][..., None]),
        arrays["train_labels"].astype(np.int32),
        _unit_images(arrays["test_images"][..., None]),
        arrays["test_labels"].astype(np.int32),
        10,
    )


def _unit_images(images: np.ndarray) -> np.ndarray:
    # Division, not a multiply by 1/255: each pixel is then the float32 nearest p / 255.
    return np.divide(images, np.float32(255.0), dtype=np.float32)


# --- TensorFlow Datasets ------------------------------------------------------------------


def _load_tfds(name: str, data_dir, download: bool) -> DatasetSplits:
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DatasetUnavailableError(
            f"{name} is loaded through tensorflow-datasets, which is not installed: {_DATA_EXTRA}"
        ) from err
    try:
        train, test = tfds.data_source(
            name, split=["train", "test"], data_dir=data_dir, download=download
        )
    except Exception as err:  # TFDS raises many types here (network, missing files, format)
        where = f"data_dir={str(data_dir)!r}" if data_dir is not None else "TFDS's default data_dir"
        raise DatasetUnavailableError(
            f"TFDS could not provide {name!r} from {where}: {_tfds_reason(tfds, name, data_dir, err)}. "
            f"TFDS downloads and prepares a dataset on first use, which needs internet "
            f"(download={download}); `{_DATA_EXTRA}` installs TFDS itself. On an offline "
            f"machine, prepare it where there is internet with `tfds build {name} "
            f"--file_format=array_record --data_dir DIR`, copy DIR here and pass data_dir=DIR"
        ) from err
    train_images, train_labels = _tfds_to_numpy(train)
    test_images, test_labels = _tfds_to_numpy(test)
    num_classes = int(train.dataset_info.features["label"].num_classes)
    return DatasetSplits(name, train_images, train_labels, test_images, test_labels, num_classes)


def _tfds_reason(tfds, name: str, data_dir, err: Exception) -> str:
    # TFDS's own message for an unprepared dataset under download=False talks about file
    # formats; say plainly that the data is not there when that is the case.
    try:
        if not tfds.builder(name, data_dir=data_dir).is_prepared():
            return "the dataset is not prepared there"
    except Exception:
        pass
    first_line = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {first_line}"


def _tfds_to_numpy(source) -> tuple[np.ndarray, np.ndarray]:
    """Copy a TFDS random-access source into preallocated uint8 / int32 arrays.

    TFDS decodes one example per call (its batched ``__getitems__`` also decodes record by
    record, and its mock data does not support it), so this loops over examples, writing
    each into the preallocated arrays: one small dict per example, never a list of them.
    """
    n = len(source)
    first = source[0]
    images = np.empty((n, *np.shape(first["image"])), np.uint8)
    labels = np.empty((n,), np.int32)
    for i in range(n):
        example = first if i == 0 else source[i]
        images[i] = example["image"]
        labels[i] = example["label"]
    return _unit_images(images), labels


# --- splits -------------------------------------------------------------------------------


def _shares(idx: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    # Cumulative rounding: the parts' sizes add up to len(idx) exactly.
    bounds = np.round(np.cumsum(proportions) * len(idx)).astype(int)
    bounds[-1] = len(idx)
    return np.split(idx, bounds[:-1])


def special_class_split(
    labels: np.ndarray, special: int, fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """OTFusion's skill-transfer split: A is a specialist of ``special``, B never sees it.

    A gets every example of class ``special`` plus ``fraction`` of each other class; B gets
    the other ``1 - fraction`` of each other class and no example of ``special``.

    Returns:
      ``(idx_a, idx_b)``: sorted, disjoint index arrays into ``labels``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    parts = proportion_split(labels, (fraction, 1.0 - fraction), special=special, seed=seed)
    return parts[0], parts[1]


def proportion_split(
    labels: np.ndarray,
    proportions: Sequence[float],
    special: int | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split every class into parts of the given ``proportions`` (normalised to sum to one).

    With ``special``, that class goes whole to the first part and only the other classes are
    split: OTFusion's four models use ``proportions=(0.1, 0.3, 0.5, 0.1), special=4``.

    Returns:
      One sorted index array per part; together they partition ``range(len(labels))``.
    """
    labels = np.asarray(labels)
    p = np.asarray(proportions, np.float64)
    if p.ndim != 1 or len(p) == 0 or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"proportions must be non-negative and not all zero, got {list(proportions)}")
    p = p / p.sum()
    if special is not None and not (labels == special).any():
        raise ValueError(f"special class {special} has no examples in labels")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in p]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if special is not None and c == special:
            parts[0].append(idx)
            continue
        for part, share in zip(parts, _shares(rng.permutation(idx), p)):
            part.append(share)
    return [np.sort(np.concatenate(part)) if part else np.zeros((0,), np.int64) for part in parts]


def dirichlet_split(
    labels: np.ndarray,
    num_clients: int,
    concentration: float,
    seed: int = 0,
    min_size: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Non-iid federated clients: each class is shared out by proportions ``~ Dir(concentration)``.

    For each class c, ``q_c ~ Dirichlet(concentration * 1_num_clients)`` and client i gets a
    ``q_c[i]`` share of class c (Hsu et al. 2019; FedMA, Wang et al. 2020). Small
    ``concentration`` gives clients few classes; large gives near-iid clients. Draws are
    repeated until every client has at least ``min_size`` examples.

    Returns:
      One sorted index array per client; together they partition ``range(len(labels))``.
    """
    labels = np.asarray(labels)
    if num_clients < 1 or concentration <= 0:
        raise ValueError(f"need num_clients >= 1 and concentration > 0, got {num_clients}, {concentration}")
    if min_size * num_clients > len(labels):
        raise ValueError(f"{num_clients} clients of at least {min_size} need more than {len(labels)} examples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        clients: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            q = rng.dirichlet(np.full(num_clients, concentration))
            for client, share in zip(clients, _shares(rng.permutation(np.flatnonzero(labels == c)), q)):
                client.append(share)
        parts = [np.sort(np.concatenate(client)) for client in clients]
        if min(len(part) for part in parts) >= min_size:
            return parts
    raise ValueError(
        f"no Dirichlet({concentration}) draw in {max_tries} tries gave every one of {num_clients} "
        f"clients {min_size} examples; lower min_size or raise concentration"
    )


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int | None = 0,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One pass over ``(images, labels)`` in minibatches, shuffled by ``seed`` (in order when None)."""
    n = len(labels)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield images[idx], labels[idx]
