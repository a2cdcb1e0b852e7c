"""Dataset loaders (real Fashion-MNIST files, TFDS mock data, digits) and fusion data splits."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from jfusion.workflow.data import (
    FASHION_MNIST_FILES,
    SYSTEM_DATA_DIRS,
    CorruptDatasetError,
    DatasetUnavailableError,
    batches,
    dirichlet_split,
    load_dataset,
    proportion_split,
    read_idx,
    special_class_split,
)
from jfusion.core.errors import JFusionError

DEBIAN_FASHION_MNIST = Path(SYSTEM_DATA_DIRS[0]) / "fashion-mnist"


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of uint8 ``array``: magic 00 00 08 ndim, big-endian sizes, the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_fashion_mnist(directory: Path, n_train=6, n_test=4, gz=True):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, stem in FASHION_MNIST_FILES.items():
        data = idx_bytes(arrays[key])
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / stem).write_bytes(data)
    return arrays


@pytest.fixture
def no_env_data(monkeypatch):
    monkeypatch.delenv("JFUSION_DATA", raising=False)


@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason="needs `sudo apt-get install dataset-fashion-mnist` (files in /usr/share/datasets/fashion-mnist)",
)
def test_fashion_mnist_real_files_have_the_published_shapes(no_env_data):
    data = load_dataset("fashion_mnist")
    assert data.train_images.shape == (60000, 28, 28, 1)
    assert data.test_images.shape == (10000, 28, 28, 1)
    assert data.train_images.dtype == np.float32 and data.test_images.dtype == np.float32
    assert data.train_labels.dtype == np.int32 and data.test_labels.dtype == np.int32
    assert data.train_images.min() == 0.0 and data.train_images.max() == 1.0
    assert data.num_classes == 10
    # Fashion-MNIST is balanced: 6000 train and 1000 test images per class.
    np.testing.assert_array_equal(np.bincount(data.train_labels), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(data.test_labels), np.full(10, 1000))


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "raw"])
def test_idx_files_are_parsed_exactly_from_data_dir(tmp_path, no_env_data, gz):
    arrays = write_fashion_mnist(tmp_path / "fm", gz=gz)
    data = load_dataset("fashion-mnist", data_dir=tmp_path / "fm", system_dirs=())
    np.testing.assert_array_equal(data.train_images[..., 0], arrays["train_images"] / np.float32(255))
    np.testing.assert_array_equal(data.test_labels, arrays["test_labels"].astype(np.int32))
    assert data.train_images.shape == (6, 28, 28, 1) and data.test_images.shape == (4, 28, 28, 1)


def test_fashion_mnist_is_found_under_env_subfolder(tmp_path, monkeypatch):
    arrays = write_fashion_mnist(tmp_path / "fashion-mnist")
    monkeypatch.setenv("JFUSION_DATA", str(tmp_path))
    data = load_dataset("fashion_mnist", system_dirs=())
    np.testing.assert_array_equal(data.train_labels, arrays["train_labels"])


def test_missing_fashion_mnist_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("JFUSION_DATA", str(tmp_path / "empty"))
    with pytest.raises(DatasetUnavailableError, match="sudo apt-get install dataset-fashion-mnist") as info:
        load_dataset("fashion_mnist", data_dir=tmp_path, system_dirs=(tmp_path / "system",))
    assert isinstance(info.value, JFusionError)
    assert str(tmp_path / "system" / "fashion-mnist") in str(info.value)


def test_corrupt_idx_files_are_clear_errors(tmp_path):
    good = idx_bytes(np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28) % 251)
    (tmp_path / "truncated").write_bytes(good[:-10])
    with pytest.raises(CorruptDatasetError, match="truncated"):
        read_idx(tmp_path / "truncated")
    (tmp_path / "magic").write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(CorruptDatasetError, match="not an IDX file"):
        read_idx(tmp_path / "magic")
    (tmp_path / "labels").write_bytes(idx_bytes(np.arange(5, dtype=np.uint8)))
    with pytest.raises(CorruptDatasetError, match="1 dimensions, expected 3"):
        read_idx(tmp_path / "labels", ndim=3)
    (tmp_path / "bad.gz").write_bytes(good)  # not gzip at all
    with pytest.raises(CorruptDatasetError, match="gzip"):
        read_idx(tmp_path / "bad.gz")
    np.testing.assert_array_equal(read_idx(tmp_path / "labels", ndim=1), np.arange(5))


@pytest.mark.parametrize(
    "name, shape, num_classes",
    [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100)],
)
def test_tfds_datasets_convert_to_numpy(name, shape, num_classes):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        data = load_dataset(name, download=False)
    assert data.name == name and data.num_classes == num_classes
    assert data.train_images.shape == (12, *shape) and data.test_images.shape == (12, *shape)
    assert data.train_images.dtype == np.float32 and data.train_labels.dtype == np.int32
    assert 0.0 <= data.train_images.min() and data.train_images.max() <= 1.0
    assert data.train_images.std() > 0  # not all one value: every example was copied
    assert 0 <= data.train_labels.min() and data.train_labels.max() < num_classes


def test_unprepared_tfds_dataset_says_how_to_get_it(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DatasetUnavailableError, match="internet") as info:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    assert "tfds build mnist" in str(info.value) and "not prepared" in str(info.value)
    assert not (tmp_path / "mnist").exists()


def test_digits_are_split_deterministically():
    data = load_dataset("digits")
    assert data.train_images.shape == (1347, 8, 8, 1) and data.test_images.shape == (450, 8, 8, 1)
    assert data.train_images.dtype == np.float32 and data.test_labels.dtype == np.int32
    assert data.train_images.min() == 0.0 and data.train_images.max() == 1.0
    assert set(np.unique(data.test_labels)) == set(range(10))
    again = load_dataset("digits")
    np.testing.assert_array_equal(data.test_images, again.test_images)


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="svhn"):
        load_dataset("svhn")


LABELS = np.random.default_rng(1).integers(0, 10, 2000)


def assert_partition(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n  # disjoint and complete


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_special_class_split_gives_the_specialist_every_special_example(fraction):
    idx_a, idx_b = special_class_split(LABELS, special=4, fraction=fraction, seed=3)
    assert_partition([idx_a, idx_b], len(LABELS))
    special = np.flatnonzero(LABELS == 4)
    np.testing.assert_array_equal(np.intersect1d(idx_a, special), special)
    assert not (LABELS[idx_b] == 4).any()
    others = len(LABELS) - len(special)
    a_others = len(idx_a) - len(special)
    assert abs(a_others - fraction * others) <= 10  # per-class rounding, one per class at most
    for c in set(range(10)) - {4}:  # the fraction holds in every other class
        n_c = (LABELS == c).sum()
        assert abs((LABELS[idx_a] == c).sum() - fraction * n_c) <= 1


def test_special_class_split_depends_on_seed_only():
    a0, _ = special_class_split(LABELS, 4, seed=0)
    np.testing.assert_array_equal(a0, special_class_split(LABELS, 4, seed=0)[0])
    assert not np.array_equal(a0, special_class_split(LABELS, 4, seed=1)[0])


def test_proportion_split_matches_otfusion_four_models():
    parts = proportion_split(LABELS, (0.1, 0.3, 0.5, 0.1), special=4)
    assert_partition(parts, len(LABELS))
    assert (LABELS[parts[0]] == 4).sum() == (LABELS == 4).sum()
    assert all(not (LABELS[p] == 4).any() for p in parts[1:])
    others = (LABELS != 4).sum()
    for part, share in zip(parts[1:], (0.3, 0.5, 0.1)):
        assert abs(len(part) - share * others) <= 10


def test_dirichlet_split_partitions_and_concentration_sets_skew():
    parts = dirichlet_split(LABELS, num_clients=5, concentration=0.1, seed=0, min_size=20)
    assert_partition(parts, len(LABELS))
    assert min(map(len, parts)) >= 20

    def mean_top_class_share(parts):
        return np.mean([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts])

    iid = dirichlet_split(LABELS, num_clients=5, concentration=1000.0, seed=0)
    assert_partition(iid, len(LABELS))
    assert mean_top_class_share(parts) > 0.3 > 0.15 > mean_top_class_share(iid)
    np.testing.assert_array_equal(parts[2], dirichlet_split(LABELS, 5, 0.1, seed=0, min_size=20)[2])


def test_dirichlet_split_impossible_min_size_is_an_error():
    with pytest.raises(ValueError, match="min_size|examples"):
        dirichlet_split(LABELS[:30], num_clients=5, concentration=0.5, min_size=10)


def test_batches_cover_every_example_once():
    x = np.arange(10)[:, None].astype(np.float32)
    y = np.arange(10)
    seen = np.concatenate([yb for _, yb in batches(x, y, 4, seed=1)])
    assert sorted(seen.tolist()) == list(range(10)) and seen.tolist() != list(range(10))
    assert [len(yb) for _, yb in batches(x, y, 4, seed=None, drop_last=True)] == [4, 4]
