"""Evaluators by dataset type, on Detectron2's evaluators."""
import logging
from typing import List, Optional

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)

from .instance_evaluation import InstanceSegEvaluator
from .ytvis_evaluation import YTVISEvaluator

logger = logging.getLogger(__name__)

__all__ = ["build_evaluator", "coco_eval_backend", "InstanceSegEvaluator", "YTVISEvaluator"]

# evaluator_type values whose datasets hold panoptic annotations.
_PANOPTIC_TYPES = (
    "coco_panoptic_seg",
    "ade20k_panoptic_seg",
    "cityscapes_panoptic_seg",
    "mapillary_vistas_panoptic_seg",
)


def coco_eval_backend() -> str:
    """Which COCOeval implementation Detectron2's COCOEvaluator will run."""
    try:
        from detectron2.evaluation.fast_eval_api import COCOeval_opt  # noqa: F401  (needs detectron2._C)
    except ImportError:
        return "pycocotools COCOeval (detectron2's compiled fast_eval_api is not available)"
    return "detectron2 fast_eval_api (compiled)"


def build_evaluator(
    cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None
) -> DatasetEvaluator:
    """The evaluators for ``dataset_name`` given its metadata's ``evaluator_type`` and the
    outputs the model produces (``MODEL.MASK_FORMER.TEST.*_ON``)."""
    meta = MetadataCatalog.get(dataset_name)
    kind = getattr(meta, "evaluator_type", None)
    test = cfg.MODEL.MASK_FORMER.TEST
    evaluators: List[DatasetEvaluator] = []

    if kind == "sem_seg" or (test.SEMANTIC_ON and kind in _PANOPTIC_TYPES and kind != "cityscapes_panoptic_seg"):
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    if kind in _PANOPTIC_TYPES and test.PANOPTIC_ON:
        evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
    if kind == "coco" or (kind in ("coco_panoptic_seg", "ade20k_panoptic_seg") and test.INSTANCE_ON):
        if not getattr(meta, "json_file", None):
            raise ValueError(
                f"{dataset_name}: instance evaluation needs a COCO-format instance json "
                "(metadata json_file); set MODEL.MASK_FORMER.TEST.INSTANCE_ON False or register it"
            )
        logger.info("COCO instance evaluation uses %s", coco_eval_backend())
        # Panoptic datasets number classes over things and stuff together.
        cls = COCOEvaluator if kind == "coco" else InstanceSegEvaluator
        evaluators.append(cls(dataset_name, output_dir=output_folder, use_fast_impl=True))
    if kind == "cityscapes_sem_seg" or (kind == "cityscapes_panoptic_seg" and test.SEMANTIC_ON):
        evaluators.append(CityscapesSemSegEvaluator(dataset_name))
    if kind == "cityscapes_instance" or (kind == "cityscapes_panoptic_seg" and test.INSTANCE_ON):
        evaluators.append(CityscapesInstanceEvaluator(dataset_name))

    if not evaluators:
        raise ValueError(
            f"no evaluator for dataset {dataset_name!r} (evaluator_type={kind!r}) with the enabled "
            "outputs (MODEL.MASK_FORMER.TEST.SEMANTIC_ON/INSTANCE_ON/PANOPTIC_ON)"
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
