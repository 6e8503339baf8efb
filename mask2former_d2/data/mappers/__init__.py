"""Training dataset mappers of MaskFormer / Mask2Former, selected by INPUT.DATASET_MAPPER_NAME."""

from .build import MAPPERS, build_dataset_mapper
from .instance import MaskFormerInstanceDatasetMapper
from .lsj import COCOInstanceNewBaselineDatasetMapper, COCOPanopticNewBaselineDatasetMapper
from .panoptic import MaskFormerPanopticDatasetMapper
from .semantic import MaskFormerSemanticDatasetMapper
from .video import YTVISDatasetMapper

__all__ = [
    "MAPPERS",
    "build_dataset_mapper",
    "COCOInstanceNewBaselineDatasetMapper",
    "COCOPanopticNewBaselineDatasetMapper",
    "MaskFormerInstanceDatasetMapper",
    "MaskFormerPanopticDatasetMapper",
    "MaskFormerSemanticDatasetMapper",
    "YTVISDatasetMapper",
]
