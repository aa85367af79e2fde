"""Reading preprocessed datasets (streamed from disk, never preloaded)."""

from egstalker.dataset.layout import DATASET_FORMAT_VERSION, DatasetLayout
from egstalker.dataset.reader import (FrameDataset, TalkingDataset, check_dataset, load_background,
                                      load_canonical_vertices, load_torso_composite, open_dataset)

__all__ = ["DATASET_FORMAT_VERSION", "DatasetLayout", "FrameDataset", "TalkingDataset", "check_dataset",
           "load_background", "load_canonical_vertices", "load_torso_composite", "open_dataset"]
