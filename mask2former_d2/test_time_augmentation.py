"""Test-time augmentation for semantic segmentation (``TEST.AUG``)."""
import copy
from typing import Any, Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.modeling import DatasetMapperTTA
from fvcore.transforms import HFlipTransform
from torch import nn

__all__ = ["SemanticSegmentorWithTTA"]


class SemanticSegmentorWithTTA(nn.Module):
    """Averages the ``sem_seg`` probabilities of a model over resized and flipped copies of
    each image (``TEST.AUG.MIN_SIZES``, ``TEST.AUG.MAX_SIZE``, ``TEST.AUG.FLIP``).

    Every augmented prediction is already at the image's original ``height`` x ``width``
    (the model resizes its outputs), so flipped ones are flipped back and all are averaged.
    """

    def __init__(self, cfg: CfgNode, model: nn.Module, tta_mapper=None, batch_size: int = 1) -> None:
        super().__init__()
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.cfg = cfg.clone()
        self.model = model
        self.tta_mapper = tta_mapper if tta_mapper is not None else DatasetMapperTTA(cfg)
        self.batch_size = batch_size

    def __call__(self, batched_inputs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return [self._inference_one(x) for x in batched_inputs]

    def _inference_one(self, inputs: Dict[str, Any]) -> Dict[str, Any]:
        inputs = copy.copy(inputs)
        if "height" not in inputs:
            inputs["height"], inputs["width"] = inputs["image"].shape[1:]
        augmented = self.tta_mapper(inputs)
        total, count = None, 0
        with torch.no_grad():
            for start in range(0, len(augmented), self.batch_size):
                chunk = augmented[start : start + self.batch_size]
                outputs = self.model(chunk)
                for aug_input, out in zip(chunk, outputs):
                    prob = out["sem_seg"]
                    if any(isinstance(t, HFlipTransform) for t in aug_input["transforms"]):
                        prob = prob.flip(dims=[2])
                    total = prob if total is None else total + prob
                    count += 1
        return {"sem_seg": total / count}
