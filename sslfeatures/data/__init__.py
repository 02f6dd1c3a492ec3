"""Data sources (images, image-caption pairs), decoding and the bad-file report."""
from .decode import IMAGE_EXTENSIONS, DecodeError, load_pil, to_uint8_image
from .loader import TrainStream, epoch_permutation
from .pairs import ImageTextPairs, PairStream, captions_from_labels
from .sources import (ArrayImages, BadFileReport, ImageFolder, ImageSource, LabelledImageFolder,
                      iterate, list_images, load_into_memory)

__all__ = ["IMAGE_EXTENSIONS", "DecodeError", "load_pil", "to_uint8_image", "TrainStream",
           "epoch_permutation", "ArrayImages", "BadFileReport", "ImageFolder", "ImageSource",
           "LabelledImageFolder", "iterate", "list_images", "load_into_memory"]
__all__ += ["ImageTextPairs", "PairStream", "captions_from_labels"]
