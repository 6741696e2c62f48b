"""Offline data sets for SAL's recipes, benchmarks and tests, as Hugging Face `datasets`."""

from sal_hf.data.text import CORPORA, load_corpus, load_rotten_tomatoes, split_corpus
from sal_hf.data.vision import (
    IMAGE_DATASETS,
    DatasetNotInstalledError,
    image_dataset_info,
    load_image_dataset,
)

__all__ = [
    "CORPORA",
    "IMAGE_DATASETS",
    "DatasetNotInstalledError",
    "image_dataset_info",
    "load_corpus",
    "load_image_dataset",
    "load_rotten_tomatoes",
    "split_corpus",
]
