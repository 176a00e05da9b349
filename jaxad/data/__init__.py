"""Reading anomaly-detection datasets: file layouts, image decoding, streamed fixed-shape batches;
writing synthetic ones (:mod:`~jaxad.data.synthetic`, :mod:`~jaxad.data.synthetic_loco`); and
synthesising anomalies on normal images (:mod:`~jaxad.data.anomalies`: Perlin masks, textures).

The TFDS builders live in :mod:`jaxad.data.tfds_builders`, imported on request so that this
package stays quick to import.
"""

from jaxad.data.images import (
    image_files,
    read_image,
    read_mask,
    resize_image,
    resize_mask,
)
from jaxad.data.layouts import Dataset, Sample, find_categories, open_dataset
from jaxad.data.loader import Batch, iterate_batches, num_batches

__all__ = [
    "Batch",
    "Dataset",
    "Sample",
    "find_categories",
    "image_files",
    "iterate_batches",
    "num_batches",
    "open_dataset",
    "read_image",
    "read_mask",
    "resize_image",
    "resize_mask",
]
