"""Turning per-query predictions into semantic, panoptic and instance outputs.

Pure functions on one image. Shapes: Q queries, K classes (K+1 with no-object), H/W the
output resolution. ``mask_cls`` are class logits (Q, K+1); ``mask_pred`` are mask logits
(Q, H, W). Every step is a tensor operation over all queries at once; the only Python loop
runs over the few kept panoptic segments, on values already moved to the host.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.structures import Boxes, Instances
from torch import Tensor
from torch.nn import functional as F

__all__ = ["semantic_inference", "panoptic_inference", "instance_inference", "masks_to_boxes"]


def semantic_inference(
    mask_cls: Tensor, mask_pred: Tensor, *, mask_prob: Optional[Tensor] = None
) -> Tensor:
    """Per-pixel class probabilities ``sum_q p_q(c) * sigmoid(m_q)``.

    Args:
        mask_cls: (Q, K+1) class logits.
        mask_pred: (Q, H, W) mask logits.
        mask_prob: ``mask_pred.sigmoid()`` if the caller already has it.

    Returns:
        (K, H, W) probabilities (not logits).
    """
    cls_prob = F.softmax(mask_cls, dim=-1)[:, :-1]  # (Q, K)
    if mask_prob is None:
        mask_prob = mask_pred.sigmoid()
    return torch.einsum("qk,qhw->khw", cls_prob, mask_prob)


def panoptic_inference(
    mask_cls: Tensor,
    mask_pred: Tensor,
    *,
    num_classes: int,
    thing_ids: Sequence[int],
    object_mask_threshold: float,
    overlap_threshold: float,
    mask_prob: Optional[Tensor] = None,
) -> Tuple[Tensor, List[Dict]]:
    """Panoptic segmentation as in Mask2Former.

    Queries whose best class is not no-object and whose score exceeds
    ``object_mask_threshold`` compete per pixel by ``score * sigmoid(mask)``. A query's segment
    is the pixels it wins where its own probability is >= 0.5; it is dropped when that won
    area is below ``overlap_threshold`` of its own (>= 0.5) area. Stuff segments of one class
    merge into the first one.

    Args:
        mask_cls: (Q, K+1) class logits.
        mask_pred: (Q, H, W) mask logits.
        num_classes: K; label K is no-object.
        thing_ids: contiguous ids of thing classes.
        object_mask_threshold, overlap_threshold: as in the config.
        mask_prob: ``mask_pred.sigmoid()`` if the caller already has it.

    Returns:
        ``panoptic_seg`` (H, W) int32 with segment ids from 1 (0 = void) and
        ``segments_info``: one dict per segment with ``id``, ``isthing``, ``category_id``.
    """
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)  # (Q,)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    h, w = mask_pred.shape[-2:]
    panoptic_seg = torch.zeros((h, w), dtype=torch.int32, device=mask_pred.device)
    if not bool(keep.any()):
        return panoptic_seg, []

    cur_scores = scores[keep]
    cur_classes = labels[keep]
    if mask_prob is None:
        cur_prob = mask_pred[keep].sigmoid()  # (N, H, W)
    else:
        cur_prob = mask_prob if bool(keep.all()) else mask_prob[keep]
    n = cur_prob.shape[0]

    winner = (cur_scores.view(-1, 1, 1) * cur_prob).argmax(0)  # (H, W) index of the winning query
    # A pixel belongs to its winner's segment only where the winner's own probability is >= 0.5.
    winner_confident = cur_prob.gather(0, winner.unsqueeze(0)).squeeze(0) >= 0.5
    won_area = torch.bincount(winner.flatten(), minlength=n)
    own_area = (cur_prob >= 0.5).flatten(1).sum(1)
    seg_area = torch.bincount(winner[winner_confident], minlength=n)

    # The segment bookkeeping needs a handful of scalars per query: one transfer.
    stats = torch.stack([cur_classes, won_area, own_area, seg_area]).tolist()
    thing_set = set(int(t) for t in thing_ids)
    segment_of_query = [0] * n
    segments_info: List[Dict] = []
    stuff_segment: Dict[int, int] = {}
    for k, (cls, won, own, seg) in enumerate(zip(*stats)):
        if won == 0 or own == 0 or seg == 0 or won / own < overlap_threshold:
            continue
        isthing = cls in thing_set
        if not isthing and cls in stuff_segment:
            segment_of_query[k] = stuff_segment[cls]
            continue
        seg_id = len(segments_info) + 1
        if not isthing:
            stuff_segment[cls] = seg_id
        segment_of_query[k] = seg_id
        segments_info.append({"id": seg_id, "isthing": isthing, "category_id": cls})

    lut = torch.tensor(segment_of_query, dtype=torch.int32, device=mask_pred.device)
    panoptic_seg = torch.where(winner_confident, lut[winner], panoptic_seg)
    return panoptic_seg, segments_info


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight XYXY boxes of binary masks (N, H, W); an empty mask gives a zero box. Returns (N, 4)
    float32 in pixel coordinates with exclusive right/bottom edges, as Detectron2's BitMasks."""
    return _boxes_from_projections(masks.any(2), masks.any(1))


def _boxes_from_projections(rows: Tensor, cols: Tensor) -> Tensor:
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


def instance_inference(
    mask_cls: Tensor,
    mask_pred: Tensor,
    *,
    num_classes: int,
    topk: int,
    thing_ids: Sequence[int] = (),
    things_only: bool = False,
    mask_prob: Optional[Tensor] = None,
) -> Instances:
    """Instance segmentation: the top-k (query, class) pairs by class probability.

    Args:
        mask_cls: (Q, K+1) class logits.
        mask_pred: (Q, H, W) mask logits.
        num_classes: K.
        topk: detections kept per image (``TEST.DETECTIONS_PER_IMAGE``).
        thing_ids: contiguous ids of thing classes, used with ``things_only``.
        things_only: keep only thing classes (panoptic models).
        mask_prob: ``mask_pred.sigmoid()`` if the caller already has it.

    Returns:
        Instances with ``pred_masks`` (N, H, W) bool (logit > 0), ``pred_boxes`` from the masks,
        ``scores`` = class probability x mean mask probability inside the mask, and
        ``pred_classes``; sorted by score, highest first.
    """
    cls_prob = F.softmax(mask_cls, dim=-1)[:, :-1]  # (Q, K)
    topk = min(topk, cls_prob.numel())
    top_scores, top_idx = cls_prob.flatten().topk(topk, sorted=True)
    labels = top_idx % num_classes
    query = torch.div(top_idx, num_classes, rounding_mode="floor")
    if things_only:
        things = torch.as_tensor(list(thing_ids), dtype=labels.dtype, device=labels.device)
        keep = torch.isin(labels, things)
        top_scores, labels, query = top_scores[keep], labels[keep], query[keep]

    # Mask statistics depend only on the query: compute them for the queries used, once each.
    used, inverse = torch.unique(query, return_inverse=True)
    logits = mask_pred[used]  # (U, H, W)
    prob = logits.sigmoid() if mask_prob is None else mask_prob[used]
    binary = logits > 0
    area = binary.flatten(1).sum(1)
    inside = torch.where(binary, prob, 0.0).flatten(1).sum(1)
    mask_score = inside / (area + 1e-6)  # (U,)
    # A row/column holds mask pixels iff its largest logit is > 0: reductions of the float
    # logits are much faster than of the boolean mask.
    boxes = _boxes_from_projections(logits.amax(2) > 0, logits.amax(1) > 0)

    scores = top_scores * mask_score[inverse]
    order = scores.argsort(descending=True)
    inverse = inverse[order]

    result = Instances(tuple(mask_pred.shape[-2:]))
    result.pred_masks = binary[inverse]
    result.pred_boxes = Boxes(boxes[inverse])
    result.scores = scores[order]
    result.pred_classes = labels[order]
    return result
