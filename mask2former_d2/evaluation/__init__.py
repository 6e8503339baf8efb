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

__all__ = ["build_evaluator", "check_evaluation", "coco_eval_backend", "InstanceSegEvaluator", "YTVISEvaluator"]

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


# What each evaluation of a panoptic dataset reads from its metadata.
_NEEDS = {
    "semantic": ("sem_seg_root",),
    "panoptic": ("panoptic_root", "panoptic_json"),
    "instance": ("json_file",),
}
# Datasets whose skipped evaluations were already reported (one warning per dataset).
_warned: set = set()


def _missing(meta, what: str) -> List[str]:
    return [k for k in _NEEDS[what] if not getattr(meta, k, None)]


def check_evaluation(cfg: CfgNode, dataset_name: str) -> List[str]:
    """The evaluations :func:`build_evaluator` runs for ``dataset_name``: those the enabled
    outputs (``MODEL.MASK_FORMER.TEST.*_ON``) and the dataset's ``evaluator_type`` call for and
    whose ground truth its metadata names. Of a panoptic dataset, an evaluation whose metadata is
    missing (e.g. no ``sem_seg_root`` / ``json_file`` for a dataset registered with Detectron2's
    ``register_coco_panoptic``) is skipped, with one warning naming the missing metadata.

    Returns:
        The names, of "semantic", "panoptic", "instance", "coco", "cityscapes_semantic",
        "cityscapes_instance".

    Raises:
        ValueError: when nothing can be evaluated.
    """
    meta = MetadataCatalog.get(dataset_name)
    kind = getattr(meta, "evaluator_type", None)
    test = cfg.MODEL.MASK_FORMER.TEST
    plan: List[str] = []
    skipped: List[str] = []

    def want(what: str, enabled: bool) -> None:
        if not enabled:
            return
        missing = _missing(meta, what)
        if missing:
            skipped.append(f"{what} (no {' / '.join(missing)})")
        else:
            plan.append(what)

    if kind == "sem_seg":
        plan.append("semantic")
    elif kind in _PANOPTIC_TYPES:
        cityscapes = kind == "cityscapes_panoptic_seg"
        want("semantic", test.SEMANTIC_ON and not cityscapes)
        want("panoptic", test.PANOPTIC_ON)
        want("instance", test.INSTANCE_ON and kind in ("coco_panoptic_seg", "ade20k_panoptic_seg"))
        if cityscapes and test.SEMANTIC_ON:
            plan.append("cityscapes_semantic")
        if cityscapes and test.INSTANCE_ON:
            plan.append("cityscapes_instance")
    elif kind == "coco":
        if not getattr(meta, "json_file", None):
            raise ValueError(f"{dataset_name}: COCO evaluation needs the instance json (metadata json_file)")
        plan.append("coco")
    elif kind == "cityscapes_sem_seg":
        plan.append("cityscapes_semantic")
    elif kind == "cityscapes_instance":
        plan.append("cityscapes_instance")
    elif kind == "ytvis":
        # YTVISEvaluator scores against json_file where it has annotations and otherwise only
        # writes the server's results file (the val/test splits of the releases).
        if not getattr(meta, "json_file", None):
            raise ValueError(f"{dataset_name}: YouTube-VIS evaluation needs the dataset json (metadata json_file)")
        plan.append("ytvis")

    if not plan:
        why = f"; skipped for missing ground truth: {', '.join(skipped)}" if skipped else ""
        raise ValueError(
            f"no evaluator for dataset {dataset_name!r} (evaluator_type={kind!r}) with the enabled "
            f"outputs (MODEL.MASK_FORMER.TEST.SEMANTIC_ON/INSTANCE_ON/PANOPTIC_ON){why}"
        )
    if skipped and dataset_name not in _warned:
        _warned.add(dataset_name)
        logger.warning(
            "%s: skipping %s evaluation: its metadata lacks the ground truth; evaluating %s only",
            dataset_name,
            ", ".join(skipped),
            ", ".join(plan),
        )
    return plan


def build_evaluator(
    cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None
) -> DatasetEvaluator:
    """The evaluators for ``dataset_name`` given its metadata's ``evaluator_type``, the
    outputs the model produces (``MODEL.MASK_FORMER.TEST.*_ON``) and the ground truth the
    metadata names (see :func:`check_evaluation`)."""
    evaluators: List[DatasetEvaluator] = []
    for what in check_evaluation(cfg, dataset_name):
        if what == "semantic":
            evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
        elif what == "panoptic":
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
        elif what in ("instance", "coco"):
            logger.info("COCO instance evaluation uses %s", coco_eval_backend())
            # Panoptic datasets number classes over things and stuff together.
            cls = COCOEvaluator if what == "coco" else InstanceSegEvaluator
            evaluators.append(cls(dataset_name, output_dir=output_folder, use_fast_impl=True))
        elif what == "cityscapes_semantic":
            evaluators.append(CityscapesSemSegEvaluator(dataset_name))
        elif what == "cityscapes_instance":
            evaluators.append(CityscapesInstanceEvaluator(dataset_name))
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
