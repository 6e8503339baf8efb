"""The MaskFormer meta-architecture (also used by Mask2Former).

Shapes: B batch, Q queries, K classes (+1 = no-object), H/W input size, Hp/Wp padded size.
"""
import contextlib
import logging
from typing import Any, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.backbone import Backbone, ResNet
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, ImageList
from detectron2.utils.memory import retry_if_cuda_oom
from torch import Tensor, nn

from ..accel import postprocessing as banded
from ..accel.fold_bn import fold_batchnorm
from ..accel.precision import check_precision, full_precision, inference_precision, precision_dtype
from .postprocessing import instance_inference, panoptic_inference, semantic_inference, upsample_masks

logger = logging.getLogger(__name__)

__all__ = ["MaskFormer"]


def _resize_output(x: Tensor, image_size: Tuple[int, int], height: int, width: int) -> Tensor:
    """(C, Hp, Wp) maps of the padded batch -> (C, height, width): crop the image's own area,
    then resize bilinearly — skipped when the size already matches, since a same-size bilinear
    resize returns its input unchanged."""
    x = x[:, : image_size[0], : image_size[1]]
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return sem_seg_postprocess(x, image_size, height, width)


def _thing_ids(metadata: Any) -> Tuple[int, ...]:
    mapping = getattr(metadata, "thing_dataset_id_to_contiguous_id", None)
    return tuple(sorted(int(v) for v in mapping.values())) if mapping else ()


def _checked_precision(precision: str, device: str) -> str:
    check_precision(precision, torch.device(device).type)
    return precision


def check_image(img: Any, channels: int, where: str) -> Tensor:
    """``img`` if it is a (channels, H, W) tensor, else a ValueError naming ``where``."""
    if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != channels:
        got = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
        raise ValueError(
            f"{where} must be a ({channels}, H, W) tensor in INPUT.FORMAT channel order; got {got}"
        )
    return img


def gt_mask_tensor(masks: Any, where: str) -> Tensor:
    """The (N, H, W) tensor of ground-truth masks given as BitMasks or a tensor; a TypeError
    naming ``where`` otherwise."""
    if isinstance(masks, BitMasks):
        masks = masks.tensor
    if not isinstance(masks, Tensor):
        raise TypeError(
            f"{where}.gt_masks must be a BitMasks or a (N, H, W) tensor; got "
            f"{type(masks).__name__} (convert polygons with the dataset mapper)"
        )
    return masks


def _float_outputs(outputs: Any) -> Any:
    """The head's outputs (nested dicts/lists of tensors) with floating tensors in float32."""
    if isinstance(outputs, Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: _float_outputs(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_float_outputs(v) for v in outputs)
    return outputs


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    """Mask classification for semantic, instance and panoptic segmentation.

    Training returns the weighted losses of the criterion; inference returns, per image, the
    outputs enabled by ``semantic_on`` / ``instance_on`` / ``panoptic_on`` in Detectron2's
    format at the requested ``height`` x ``width``.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        criterion: Optional[nn.Module],
        num_queries: int,
        object_mask_threshold: float,
        overlap_threshold: float,
        metadata: Any,
        size_divisibility: int,
        sem_seg_postprocess_before_inference: bool,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        semantic_on: bool = True,
        panoptic_on: bool = False,
        instance_on: bool = False,
        test_topk_per_image: int = 100,
        precision: str = "fp32",
        fast_paths: bool = True,
    ) -> None:
        """
        Args:
            backbone: a Detectron2 backbone.
            sem_seg_head: head returning ``pred_logits``/``pred_masks`` (e.g. MaskFormerHead).
            criterion: the training loss, with a ``weight_dict``; may be None for inference-only
                models.
            num_queries: number of queries.
            object_mask_threshold: panoptic: minimum class score of a kept query.
            overlap_threshold: panoptic: minimum won-area / own-area of a kept segment.
            metadata: dataset metadata; ``thing_dataset_id_to_contiguous_id`` decides which
                classes are things.
            size_divisibility: pad inputs to a multiple of this; < 0 uses the backbone's.
            sem_seg_postprocess_before_inference: resize mask logits to the output size
                before semantic inference (always the case for panoptic/instance output).
            pixel_mean, pixel_std: per-channel normalisation, in the input's channel order.
            semantic_on, panoptic_on, instance_on: which outputs inference produces.
            test_topk_per_image: instance detections kept per image.
            precision: inference arithmetic, "fp32", "bf16" or "fp16" (see
                :mod:`mask2former_d2.accel.precision`); the device must support it.
            fast_paths: use the fast formulations of :mod:`mask2former_d2.accel` (folded frozen
                batch norms, a channels-last ResNet input, banded post-processing) instead of the
                reference ones; same outputs up to float rounding.
        """
        super().__init__()
        if not (semantic_on or panoptic_on or instance_on):
            raise ValueError(
                "MODEL.MASK_FORMER.TEST: SEMANTIC_ON, INSTANCE_ON and PANOPTIC_ON are all False; "
                "enable at least one output"
            )
        if len(pixel_mean) != len(pixel_std):
            raise ValueError(
                f"MODEL.PIXEL_MEAN has {len(pixel_mean)} values but MODEL.PIXEL_STD has {len(pixel_std)}"
            )
        self.backbone = backbone
        self.fast_paths = fast_paths
        if fast_paths:
            # Batch norms (frozen, or in eval mode) run folded into their convolutions at
            # inference; checkpoints are unaffected.
            fold_batchnorm(backbone)
            fold_batchnorm(sem_seg_head)
        # Channels-last is oneDNN's native layout: a ResNet's convolutions skip the layout
        # conversions, and its features stay channels-last.
        self.channels_last_input = fast_paths and isinstance(backbone, ResNet)
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_queries = num_queries
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.metadata = metadata
        self.thing_ids = _thing_ids(metadata)
        if panoptic_on and not self.thing_ids:
            logger.warning(
                "panoptic inference: the dataset metadata has no thing_dataset_id_to_contiguous_id; "
                "every class is treated as stuff"
            )
        self.size_divisibility = (
            size_divisibility if size_divisibility >= 0 else backbone.size_divisibility
        )
        self.sem_seg_postprocess_before_inference = (
            sem_seg_postprocess_before_inference or panoptic_on or instance_on
        )
        # Not saved in checkpoints (the published ones do not hold them).
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.semantic_on = semantic_on
        self.panoptic_on = panoptic_on
        self.instance_on = instance_on
        self.test_topk_per_image = test_topk_per_image
        self.precision = precision
        self.precision_dtype = precision_dtype(precision)
        # Set by callers that only need class ids (e.g. to draw them): ``sem_seg`` is then the
        # (height, width) int64 argmax over classes, and no (K, height, width) probabilities are
        # ever held (they are ~13 GB for 133 classes at 6000x4000).
        self.semantic_labels = False

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict[str, Any]:
        from .criterion import build_criterion

        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": build_criterion(cfg, sem_seg_head.num_classes),
            **cls.inference_options(cfg),
        }

    @classmethod
    def inference_options(cls, cfg: CfgNode) -> Dict[str, Any]:
        """The constructor arguments other than the modules: what pre- and post-processing
        need (e.g. to post-process outputs computed by an exported graph)."""
        test = cfg.MODEL.MASK_FORMER.TEST
        names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
        metadata = MetadataCatalog.get(names[0]) if names else None
        return {
            "num_queries": cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES,
            "object_mask_threshold": test.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": test.OVERLAP_THRESHOLD,
            "metadata": metadata,
            "size_divisibility": cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": test.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "semantic_on": test.SEMANTIC_ON,
            "instance_on": test.INSTANCE_ON,
            "panoptic_on": test.PANOPTIC_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            # Checked against the device here, so that an unavailable precision fails at build.
            "precision": _checked_precision(test.PRECISION, cfg.MODEL.DEVICE),
            "fast_paths": cfg.MODEL.MASK_FORMER.FAST_PATHS,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def _input_images(self, batched_inputs: List[Dict[str, Any]]) -> List[Tensor]:
        """The (C, H, W) images of a batch, checked (a video model returns every frame)."""
        channels = self.pixel_mean.shape[0]
        return [
            check_image(x.get("image") if isinstance(x, dict) else None, channels, f"batched_inputs[{i}]['image']")
            for i, x in enumerate(batched_inputs)
        ]

    def _normalize(self, image: Tensor) -> Tensor:
        return (image.to(self.device) - self.pixel_mean) / self.pixel_std

    def preprocess_image(self, batched_inputs: List[Dict[str, Any]]) -> ImageList:
        """Normalises each image, then pads the batch with zeros to ``size_divisibility``."""
        images = [self._normalize(img) for img in self._input_images(batched_inputs)]
        return ImageList.from_tensors(images, self.size_divisibility)

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        """
        Args:
            batched_inputs: one dict per image with ``image`` (C, H, W) and, for training,
                ``instances`` (``gt_classes``, ``gt_masks``); for inference optionally the output
                ``height`` and ``width``.

        Returns:
            training: dict of weighted losses. Inference: one dict per image with ``sem_seg``
            (K, height, width) probabilities, ``panoptic_seg`` (seg (height, width) int32,
            segments_info) and ``instances`` as enabled.
        """
        if self.training:
            images = self.preprocess_image(batched_inputs)
            outputs = self.sem_seg_head(self.backbone(images.tensor))
            return self.losses(outputs, self.prepare_targets(batched_inputs, images), images.tensor)
        return self.inference(batched_inputs)

    def losses(
        self, outputs: Dict[str, Any], targets: Optional[List[Dict[str, Tensor]]], like: Tensor
    ) -> Dict[str, Tensor]:
        """The weighted losses of the head's ``outputs``; the matching and the losses run in
        float32 (also under AMP), on the device of ``like``."""
        if self.criterion is None:
            raise RuntimeError(f"this {type(self).__name__} was built without a criterion; it cannot train")
        with full_precision(like):
            losses = self.criterion(_float_outputs(outputs), targets)
        weights = self.criterion.weight_dict
        return {k: v * weights[k] for k, v in losses.items() if k in weights}

    def inference(self, batched_inputs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Eval-mode outputs of a batch (see :meth:`forward`)."""
        images = self.preprocess_image(batched_inputs)
        with self.inference_precision():
            outputs = self.sem_seg_head(self.backbone(self._backbone_input(images.tensor)))
        outputs = _float_outputs(outputs)
        padded_size = tuple(images.tensor.shape[-2:])
        return self.postprocess(
            outputs["pred_logits"], outputs["pred_masks"], padded_size, images.image_sizes,
            batched_inputs,
        )

    def inference_precision(self) -> ContextManager:
        """The context of the network at inference: ``self.precision`` (autocast to bf16 / fp16,
        see :mod:`mask2former_d2.accel.precision`; the device must support it), or nothing for
        float32."""
        if self.precision_dtype == torch.float32:
            return contextlib.nullcontext()
        device_type = self.device.type
        return inference_precision(check_precision(self.precision, device_type), device_type)

    def postprocess(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        padded_size: Tuple[int, int],
        image_sizes: Sequence[Tuple[int, int]],
        batched_inputs: Sequence[Dict[str, Any]],
    ) -> List[Dict[str, Any]]:
        """Inference outputs of a batch from the network's (B, Q, K+1) class logits and
        (B, Q, h, w) mask logits, computed on the batch padded to ``padded_size``; image i has
        size ``image_sizes[i]`` inside it and its requested output size in
        ``batched_inputs[i]`` (see :meth:`inference_single`). The network may have run
        anywhere (e.g. an exported graph in ONNX Runtime)."""
        return [
            self.inference_single(mask_cls, mask_pred, padded_size, size, x)
            for mask_cls, mask_pred, size, x in zip(pred_logits, pred_masks, image_sizes, batched_inputs)
        ]

    def _backbone_input(self, x: Tensor) -> Tensor:
        """The padded batch as the backbone takes it at inference: cast once to the inference
        precision, and in the memory layout chosen at build (``channels_last_input``; same
        values up to rounding). Training takes it as it is."""
        if self.training:
            return x
        x = x.to(self.precision_dtype)
        if self.channels_last_input:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def inference_single(
        self,
        mask_cls: Tensor,
        mask_pred: Tensor,
        padded_size: Tuple[int, int],
        image_size: Tuple[int, int],
        inputs: Dict,
    ) -> Dict[str, Any]:
        """Outputs of one image from its (Q, K+1) class logits and (Q, h, w) low-resolution mask
        logits, as the published model: masks upsampled to the padded batch, cropped to the image
        and resized to the requested ``height``/``width``, then semantic / panoptic / instance
        inference (:mod:`.postprocessing`; with ``fast_paths``, a band of rows at a time by
        :mod:`mask2former_d2.accel.postprocessing`)."""
        height = inputs.get("height", image_size[0])
        width = inputs.get("width", image_size[1])
        num_classes = self.sem_seg_head.num_classes
        resize_first = self.sem_seg_postprocess_before_inference
        out_size = (height, width) if resize_first else tuple(image_size)
        panoptic = instance = None
        if self.panoptic_on:
            panoptic = dict(
                num_classes=num_classes,
                thing_ids=self.thing_ids,
                object_mask_threshold=self.object_mask_threshold,
                overlap_threshold=self.overlap_threshold,
            )
        if self.instance_on:
            instance = dict(
                num_classes=num_classes,
                topk=self.test_topk_per_image,
                thing_ids=self.thing_ids,
                things_only=self.panoptic_on,
            )
        if self.fast_paths:
            masks = banded.MaskLogitRows(mask_pred, padded_size, image_size, out_size)
            result = retry_if_cuda_oom(banded.postprocess_masks)(
                mask_cls, masks, semantic=self.semantic_on, panoptic=panoptic, instance=instance,
                semantic_labels=self.semantic_labels and resize_first,
            )
        else:
            result = retry_if_cuda_oom(_reference_outputs)(
                mask_cls, upsample_masks(mask_pred, padded_size, image_size, out_size),
                self.semantic_on, panoptic, instance,
            )
        if self.semantic_on and not resize_first:
            # (K, h, w) at the image's size -> the requested size.
            if self.semantic_labels and self.fast_paths:
                result["sem_seg"] = retry_if_cuda_oom(banded.semantic_labels)(result["sem_seg"], (height, width))
            else:
                result["sem_seg"] = retry_if_cuda_oom(_resize_output)(
                    result["sem_seg"], image_size, height, width
                )
        if self.semantic_on and self.semantic_labels and result["sem_seg"].dim() == 3:
            result["sem_seg"] = result["sem_seg"].argmax(0)
        return {k: result[k] for k in ("sem_seg", "panoptic_seg", "instances") if k in result}

    def prepare_targets(
        self, batched_inputs: List[Dict[str, Any]], images: ImageList
    ) -> Optional[List[Dict[str, Tensor]]]:
        """Per image ``labels`` (N,) and ``masks`` (N, Hp, Wp), the ground truth padded to the
        batch's padded size; None without ``instances``."""
        if "instances" not in batched_inputs[0]:
            return None
        h_pad, w_pad = images.tensor.shape[-2:]
        out = []
        for i, x in enumerate(batched_inputs):
            inst = x["instances"].to(self.device)
            masks = gt_mask_tensor(inst.gt_masks, f"batched_inputs[{i}]['instances']")
            padded = masks.new_zeros((masks.shape[0], h_pad, w_pad))
            padded[:, : masks.shape[1], : masks.shape[2]] = masks
            out.append({"labels": inst.gt_classes, "masks": padded})
        return out


def _reference_outputs(
    mask_cls: Tensor, masks: Tensor, semantic: bool, panoptic: Optional[Dict], instance: Optional[Dict]
) -> Dict[str, Any]:
    """The requested outputs of one image from its (Q, H, W) full-resolution mask logits."""
    result: Dict[str, Any] = {}
    if semantic:
        result["sem_seg"] = semantic_inference(mask_cls, masks)
    if panoptic is not None:
        result["panoptic_seg"] = panoptic_inference(mask_cls, masks, **panoptic)
    if instance is not None:
        result["instances"] = instance_inference(mask_cls, masks, **instance)
    return result
