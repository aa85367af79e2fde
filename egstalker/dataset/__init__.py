"""Reading preprocessed datasets (streamed from disk, never preloaded)."""

from egstalker.dataset.layout import DATASET_FORMAT_VERSION, DatasetLayout

__all__ = ["DATASET_FORMAT_VERSION", "DatasetLayout"]
