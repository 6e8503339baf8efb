"""How far one set of model outputs is from another (e.g. bf16 or an exported graph vs the
float32 model): per-image agreement of the semantic, panoptic and instance outputs.

Shapes: K classes, H/W the output size, N instances.
"""
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["output_agreement"]


def output_agreement(reference: dict, other: dict) -> dict:
    """How far one image's model outputs ``other`` are from ``reference`` (e.g. bf16 vs fp32).

    Returns the keys of the outputs both have:
      - ``semantic_agreement``: fraction of pixels with the same ``sem_seg`` argmax;
      - ``panoptic_agreement``: fraction of pixels whose segment has the same category (void
        included), after which ``panoptic_segments`` = (reference, other) segment counts and
        ``same_segments`` = whether the multisets of (category, isthing) are equal;
      - ``instance_mask_iou``: mean mask IoU of the reference instances, each paired with one
        instance of ``other`` of the same class by a maximum-IoU assignment (not by score
        order, which small score changes permute); unpaired ones count 0;
        ``instance_mask_iou_weighted`` the same mean weighted by the reference scores (the
        near-zero-score queries, whose small masks hover around logit 0, weigh little, as in
        AP); ``instances`` = (reference, other) counts.
    """
    out: dict = {}
    if "sem_seg" in reference and "sem_seg" in other:
        a, b = reference["sem_seg"].argmax(0), other["sem_seg"].argmax(0)
        out["semantic_agreement"] = float((a == b).float().mean())
    if "panoptic_seg" in reference and "panoptic_seg" in other:
        maps, keys = [], []
        for seg, info in (reference["panoptic_seg"], other["panoptic_seg"]):
            lut = torch.full((int(seg.max()) + 1,), -1, dtype=torch.long)
            for s in info:
                lut[s["id"]] = s["category_id"]
            maps.append(lut[seg.long().clamp(min=0)])
            keys.append(sorted((s["category_id"], bool(s["isthing"])) for s in info))
        out["panoptic_agreement"] = float((maps[0] == maps[1]).float().mean())
        out["panoptic_segments"] = (len(keys[0]), len(keys[1]))
        out["same_segments"] = keys[0] == keys[1]
    if "instances" in reference and "instances" in other:
        ra, rb = reference["instances"], other["instances"]
        out["instances"] = (len(ra), len(rb))
        if len(ra) and len(rb):
            ma = ra.pred_masks.flatten(1).float()
            mb = rb.pred_masks.flatten(1).float()
            inter = ma @ mb.t()
            union = ma.sum(1)[:, None] + mb.sum(1)[None] - inter
            iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
            iou = iou * (ra.pred_classes[:, None] == rb.pred_classes[None]).float()
            rows, cols = linear_sum_assignment(iou.numpy(), maximize=True)
            paired = torch.zeros(len(ra))
            paired[torch.as_tensor(rows)] = iou[rows, cols]
            scores = ra.scores.float()
            out["instance_mask_iou"] = float(paired.mean())
            out["instance_mask_iou_weighted"] = float((paired * scores).sum() / scores.sum().clamp(min=1e-12))
        else:
            out["instance_mask_iou"] = out["instance_mask_iou_weighted"] = float(len(ra) == len(rb))
    return out
