"""Registers every dataset of this package under ``$DETECTRON2_DATASETS`` (default ``./datasets``).

Registration is lazy (nothing is read until ``DatasetCatalog.get``) and idempotent (a name that
is already registered is left alone), so importing this module twice is harmless. Cityscapes
needs nothing here: Detectron2's built-in ``cityscapes_fine_*`` sets are used as they are.
"""

import os

from ..toy import register_toy_panoptic
from ..toy_video import register_toy_ytvis
from .ade20k import register_all_ade20k
from .ade20k_full import register_all_ade20k_full
from .coco import register_all_coco
from .mapillary_vistas import register_all_mapillary_vistas
from .utils import datasets_root
from .ytvis import register_all_ytvis

__all__ = ["register_all"]


def register_all(root: str) -> None:
    """Registers (or completes the metadata of) every dataset of this package under ``root``."""
    register_all_coco(root)
    register_all_ade20k(root)
    register_all_ade20k_full(root)
    register_all_mapillary_vistas(root)
    register_all_ytvis(root)
    # Generated on first use: a dataset every command can train and evaluate on offline.
    register_toy_panoptic(os.path.join(root, "toy_panoptic"))
    register_toy_ytvis(os.path.join(root, "toy_ytvis"))


register_all(datasets_root())
