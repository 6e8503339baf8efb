"""Name -> mapper lookup for ``INPUT.DATASET_MAPPER_NAME``."""

from typing import Callable, Dict, Type

from detectron2.config import CfgNode

from .instance import MaskFormerInstanceDatasetMapper
from .lsj import COCOInstanceNewBaselineDatasetMapper, COCOPanopticNewBaselineDatasetMapper
from .panoptic import DETRPanopticDatasetMapper, MaskFormerPanopticDatasetMapper
from .semantic import MaskFormerSemanticDatasetMapper
from .video import YTVISDatasetMapper

__all__ = ["MAPPERS", "build_dataset_mapper"]

# The published mapper names; configs select one with INPUT.DATASET_MAPPER_NAME.
MAPPERS: Dict[str, Type] = {
    "mask_former_semantic": MaskFormerSemanticDatasetMapper,
    "mask_former_panoptic": MaskFormerPanopticDatasetMapper,
    "mask_former_instance": MaskFormerInstanceDatasetMapper,
    "coco_instance_lsj": COCOInstanceNewBaselineDatasetMapper,
    "coco_panoptic_lsj": COCOPanopticNewBaselineDatasetMapper,
    "detr_panoptic": DETRPanopticDatasetMapper,
    # Video instance segmentation (YouTube-VIS records); train_net_video.py uses it whatever the name.
    "ytvis": YTVISDatasetMapper,
}


def build_dataset_mapper(cfg: CfgNode, is_train: bool = True) -> Callable[[dict], dict]:
    """Builds the mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``.

    Args:
        cfg: a config with the MaskFormer keys (``add_maskformer2_config``).
        is_train: build the training mapper (augmentations from ``INPUT.*_TRAIN``, ground
            truth required) or the evaluation one (test-time resize, ground truth optional).

    Returns:
        A callable mapping one Detectron2 dataset dict to a model input dict.

    Raises:
        KeyError: the name is not one of ``MAPPERS``; the message lists the valid names.
    """
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in MAPPERS:
        raise KeyError(
            f"INPUT.DATASET_MAPPER_NAME={name!r} is not a known dataset mapper; "
            f"valid names: {', '.join(sorted(MAPPERS))}"
        )
    return MAPPERS[name](cfg, is_train)
