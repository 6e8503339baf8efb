"""Turning per-query predictions into semantic, panoptic and instance outputs (the reference
formulation, as in the Mask2Former paper and its published code).

Shapes: Q queries, K classes (K+1 with no-object), h/w the mask-logit size, Hp/Wp the padded
batch size, H/W the output size. ``mask_cls`` are class logits (Q, K+1); ``mask_pred`` are mask
logits (Q, H, W) at the output resolution.

Every function here holds whole (Q, H, W) tensors. :mod:`mask2former_d2.accel.postprocessing`
computes the same outputs a band of rows at a time (the model's default); tests hold the two
equal.
"""
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import Boxes, Instances
from torch import Tensor
from torch.nn import functional as F

__all__ = [
    "assign_segments",
    "boxes_from_projections",
    "instance_inference",
    "masks_to_boxes",
    "panoptic_inference",
    "semantic_inference",
    "upsample_masks",
]


def upsample_masks(
    mask_pred: Tensor, padded_size: Tuple[int, int], image_size: Tuple[int, int], output_size: Tuple[int, int]
) -> Tensor:
    """(Q, h, w) mask logits of one image -> (Q, H, W): upsampled to the padded batch, cropped to
    the image's own ``image_size`` and resized to ``output_size`` (all bilinear)."""
    padded = F.interpolate(mask_pred[None], size=tuple(padded_size), mode="bilinear", align_corners=False)[0]
    return sem_seg_postprocess(padded, tuple(image_size), output_size[0], output_size[1])


def semantic_inference(mask_cls: Tensor, mask_pred: Tensor) -> Tensor:
    """Per-pixel class probabilities ``sum_q p_q(c) * sigmoid(m_q)``: (K, H, W)."""
    cls_prob = F.softmax(mask_cls, dim=-1)[:, :-1]  # (Q, K)
    return torch.einsum("qc,qhw->chw", cls_prob, mask_pred.sigmoid())


def panoptic_inference(
    mask_cls: Tensor,
    mask_pred: Tensor,
    *,
    num_classes: int,
    thing_ids: Sequence[int],
    object_mask_threshold: float,
    overlap_threshold: float,
) -> Tuple[Tensor, List[Dict]]:
    """Panoptic segmentation as in Mask2Former.

    Queries whose best class is not no-object and whose score exceeds
    ``object_mask_threshold`` compete per pixel by ``score * sigmoid(mask)``. A query's segment
    is the pixels it wins where its own probability is >= 0.5; it is dropped when that won area
    is below ``overlap_threshold`` of its own (>= 0.5) area. Stuff segments of one class merge
    into the first one.

    Returns:
        ``panoptic_seg`` (H, W) int32 with segment ids from 1 (0 = void) and ``segments_info``:
        one dict per segment with ``id``, ``isthing``, ``category_id``.
    """
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    scores, labels, prob = scores[keep], labels[keep], mask_pred[keep].sigmoid()  # (n,), (n,), (n, H, W)
    panoptic_seg = torch.zeros(mask_pred.shape[-2:], dtype=torch.int32, device=mask_pred.device)
    segments_info: List[Dict] = []
    if prob.shape[0] == 0:
        return panoptic_seg, segments_info
    winner = (scores.view(-1, 1, 1) * prob).argmax(0)  # (H, W): the winning query of each pixel
    areas = []  # per query: pixels won, pixels of its own mask, pixels of its segment
    for k in range(prob.shape[0]):
        won, own = winner == k, prob[k] >= 0.5
        areas.append((int(won.sum()), int(own.sum()), int((won & own).sum())))
    segment_ids, segments_info = assign_segments(labels.tolist(), areas, thing_ids, overlap_threshold)
    for k, seg_id in enumerate(segment_ids):
        if seg_id:
            panoptic_seg[(winner == k) & (prob[k] >= 0.5)] = seg_id
    return panoptic_seg, segments_info


def assign_segments(
    classes: Sequence[int],
    areas: Sequence[Tuple[int, int, int]],
    thing_ids: Sequence[int],
    overlap_threshold: float,
) -> Tuple[List[int], List[Dict]]:
    """Segment ids of the kept queries of :func:`panoptic_inference`, in query order.

    Args:
        classes: each query's class.
        areas: each query's (won, own, segment) pixel counts.
        thing_ids, overlap_threshold: as for :func:`panoptic_inference`.

    Returns:
        the segment id of every query (0 = dropped) and ``segments_info``.
    """
    thing_set = set(int(t) for t in thing_ids)
    segment_ids = [0] * len(classes)
    segments_info: List[Dict] = []
    stuff_segment: Dict[int, int] = {}
    for k, (cls, (won, own, seg)) in enumerate(zip(classes, areas)):
        if won == 0 or own == 0 or seg == 0 or won / own < overlap_threshold:
            continue
        isthing = cls in thing_set
        if not isthing and cls in stuff_segment:
            segment_ids[k] = stuff_segment[cls]  # stuff of one class merges into one segment
            continue
        seg_id = len(segments_info) + 1
        if not isthing:
            stuff_segment[cls] = seg_id
        segment_ids[k] = seg_id
        segments_info.append({"id": seg_id, "isthing": isthing, "category_id": cls})
    return segment_ids, segments_info


def instance_inference(
    mask_cls: Tensor,
    mask_pred: Tensor,
    *,
    num_classes: int,
    topk: int,
    thing_ids: Sequence[int] = (),
    things_only: bool = False,
) -> Instances:
    """Instance segmentation: the top-k (query, class) pairs by class probability.

    Args:
        topk: detections kept per image (``TEST.DETECTIONS_PER_IMAGE``).
        thing_ids, things_only: keep only thing classes (panoptic models).

    Returns:
        Instances with ``pred_masks`` (N, H, W) bool (logit > 0), ``pred_boxes`` from the masks,
        ``scores`` = class probability x mean mask probability inside the mask, and
        ``pred_classes``; sorted by score, highest first.
    """
    cls_prob = F.softmax(mask_cls, dim=-1)[:, :-1]  # (Q, K)
    top_scores, top_idx = cls_prob.flatten().topk(min(topk, cls_prob.numel()), sorted=True)
    labels = top_idx % num_classes
    query = torch.div(top_idx, num_classes, rounding_mode="floor")
    if things_only:
        keep = torch.isin(labels, torch.as_tensor(list(thing_ids), dtype=labels.dtype, device=labels.device))
        top_scores, labels, query = top_scores[keep], labels[keep], query[keep]
    logits = mask_pred[query]  # (N, H, W)
    masks = logits > 0
    mask_score = (logits.sigmoid() * masks).sum((1, 2)) / (masks.sum((1, 2)) + 1e-6)
    scores = top_scores.float() * mask_score.float()
    order = scores.argsort(descending=True)
    result = Instances(tuple(mask_pred.shape[-2:]))
    result.pred_masks = masks[order]
    result.pred_boxes = Boxes(masks_to_boxes(result.pred_masks))
    result.scores = scores[order]
    result.pred_classes = labels[order]
    return result


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight XYXY boxes of binary masks (N, H, W); an empty mask gives a zero box. Returns (N, 4)
    float32 in pixel coordinates with exclusive right/bottom edges, as Detectron2's BitMasks."""
    return boxes_from_projections(masks.any(2), masks.any(1))


def boxes_from_projections(rows: Tensor, cols: Tensor) -> Tensor:
    """Boxes from which rows (N, H) and columns (N, W) of each mask hold pixels."""
    n, h, w = rows.shape[0], rows.shape[1], cols.shape[1]
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=rows.device)
    ys = torch.arange(h, device=rows.device)
    xs = torch.arange(w, device=rows.device)
    big = max(h, w)
    y0 = torch.where(rows, ys, big).amin(1)
    y1 = torch.where(rows, ys, -1).amax(1) + 1
    x0 = torch.where(cols, xs, big).amin(1)
    x1 = torch.where(cols, xs, -1).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    return torch.where(rows.any(1, keepdim=True), boxes, torch.zeros_like(boxes))
