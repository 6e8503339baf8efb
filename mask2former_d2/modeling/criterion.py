"""Set-prediction losses of MaskFormer / Mask2Former.

Shapes: B batch, Q queries, K classes (+1 = no-object), G ground-truth segments of one image,
N matched (query, segment) pairs of the batch, P points per mask, H/W prediction mask size,
Hm/Wm (padded) target mask size.

Each query is matched one-to-one to a segment by ``HungarianMatcher``; then

* ``loss_ce``: cross entropy over the K+1 classes for all B*Q queries; unmatched queries are
  supervised as no-object, whose class weight is ``eos_coef``.
* ``loss_mask`` / ``loss_dice``: on the N matched pairs, normalised by the number of target
  segments averaged over workers. ``mask_loss_type="point"`` (Mask2Former) evaluates sigmoid BCE
  and dice on P points chosen by PointRend importance sampling; ``"full"`` (MaskFormer) upsamples
  the predictions to the target size and evaluates sigmoid focal loss and dice on every pixel.

Video (Mask2Former-VIS): with (B, Q, T, H, W) predictions and (G, T, Hm, Wm) target tracks, the
matcher works on whole tracks and the mask losses treat each frame of a matched pair as one mask
(points sampled per frame), still normalised by the number of tracks.

The criterion returns unweighted losses; the meta-architecture scales them by ``weight_dict``
and drops the keys it does not hold. Auxiliary (deep supervision) outputs get the same losses
with a ``_{i}`` suffix.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils import comm
from torch import Tensor, nn

from .matcher import HungarianMatcher, batch_mask_size, pad_masks

# Per image: the targets' tensors, and the matched (query indices, target indices).
Targets = List[Dict[str, Tensor]]
Indices = List[Tuple[Tensor, Tensor]]

__all__ = [
    "SetCriterion",
    "build_criterion",
    "dice_loss",
    "sigmoid_bce_loss",
    "sigmoid_focal_loss",
]


_LOSS_NAMES = ("labels", "masks")
_MASK_LOSS_TYPES = ("point", "full")


def sigmoid_bce_loss(logits: Tensor, labels: Tensor, num_masks: float) -> Tensor:
    """Sigmoid BCE averaged over the points of each mask, summed over masks / ``num_masks``.

    Args:
        logits: (N, P) mask logits.
        labels: (N, P) targets in [0, 1].
        num_masks: normaliser (number of target segments).
    """
    per_point = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # (N, P)
    return per_point.mean(1).sum() / num_masks


def sigmoid_focal_loss(
    logits: Tensor,
    labels: Tensor,
    num_masks: float,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """Sigmoid focal loss (RetinaNet) averaged per mask, summed over masks / ``num_masks``.

    Args:
        logits: (N, P) mask logits.
        labels: (N, P) targets in [0, 1].
        num_masks: normaliser (number of target segments).
        alpha: weight of the positive pixels (1 - alpha for the negative ones); < 0 disables it.
        gamma: focusing exponent on (1 - p_t).
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # (N, P)
    p_t = prob * labels + (1.0 - prob) * (1.0 - labels)  # probability of the true label
    per_point = ce * (1.0 - p_t).pow(gamma)
    if alpha >= 0:
        per_point = per_point * (alpha * labels + (1.0 - alpha) * (1.0 - labels))
    return per_point.mean(1).sum() / num_masks


def dice_loss(logits: Tensor, labels: Tensor, num_masks: float) -> Tensor:
    """Soft dice loss with +1 smoothing, summed over masks / ``num_masks``.

    Args:
        logits: (N, P) mask logits.
        labels: (N, P) targets in [0, 1].
        num_masks: normaliser (number of target segments).
    """
    prob = logits.sigmoid()
    overlap = (prob * labels).sum(-1)  # (N,)
    total = prob.sum(-1) + labels.sum(-1)  # (N,)
    return (1.0 - (2.0 * overlap + 1.0) / (total + 1.0)).sum() / num_masks


def point_uncertainty(logits: Tensor) -> Tensor:
    """Uncertainty of class-agnostic mask logits (R, 1, P): highest where the logit is near 0."""
    return -logits.abs()


class SetCriterion(nn.Module):
    """Hungarian-matched classification and mask losses, with deep supervision.

    The only state is the persistent buffer ``empty_weight`` (K+1,), the class weights of the
    cross entropy; it is part of the published checkpoints (``criterion.empty_weight``).
    """

    @configurable
    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: Sequence[str],
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        *,
        mask_loss_type: str = "point",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        """
        Args:
            num_classes: K, the number of classes without no-object.
            matcher: called as ``matcher(outputs, targets)``, returns one ``(pred_idx,
                tgt_idx)`` pair per image (see ``HungarianMatcher``).
            weight_dict: loss name -> weight; stored for the meta-architecture, not applied here.
            eos_coef: class weight of no-object in ``loss_ce``.
            losses: subset of ("labels", "masks").
            num_points: points per mask for ``mask_loss_type="point"``.
            oversample_ratio: PointRend oversampling (>= 1) for the importance sampling.
            importance_sample_ratio: fraction in [0, 1] of the points taken where the prediction
                is most uncertain; the rest are uniform.
            mask_loss_type: "point" (BCE + dice on sampled points, Mask2Former) or "full"
                (focal + dice on full-resolution masks, MaskFormer).
            focal_alpha: alpha of the focal loss ("full" only).
            focal_gamma: gamma of the focal loss ("full" only).
        """
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"SetCriterion: num_classes must be > 0, got {num_classes}")
        unknown = [name for name in losses if name not in _LOSS_NAMES]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; valid: {list(_LOSS_NAMES)}")
        if mask_loss_type not in _MASK_LOSS_TYPES:
            raise ValueError(
                f"SetCriterion: mask_loss_type must be one of {list(_MASK_LOSS_TYPES)}, got "
                f"{mask_loss_type!r} (MODEL.MASK_FORMER.MASK_LOSS_TYPE)"
            )
        if mask_loss_type == "point":
            if num_points <= 0:
                raise ValueError(f"SetCriterion: num_points must be > 0, got {num_points}")
            if oversample_ratio < 1:
                raise ValueError(
                    f"SetCriterion: oversample_ratio must be >= 1, got {oversample_ratio}"
                )
            if not 0.0 <= importance_sample_ratio <= 1.0:
                raise ValueError(
                    "SetCriterion: importance_sample_ratio must be in [0, 1], got "
                    f"{importance_sample_ratio}"
                )
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = float(eos_coef)
        self.losses = list(losses)
        self.num_points = int(num_points)
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        self.mask_loss_type = mask_loss_type
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = self.eos_coef
        self.register_buffer("empty_weight", empty_weight)  # persistent: in the checkpoints

    @classmethod
    def from_config(cls, cfg: CfgNode, num_classes: int) -> Dict[str, Any]:
        mf = cfg.MODEL.MASK_FORMER
        mask_loss_type = mf.MASK_LOSS_TYPE
        if mask_loss_type not in _MASK_LOSS_TYPES:
            raise ValueError(
                f"MODEL.MASK_FORMER.MASK_LOSS_TYPE must be one of {list(_MASK_LOSS_TYPES)}, got "
                f"{mask_loss_type!r}"
            )
        point = mask_loss_type == "point"
        # MaskFormer matched with a focal cost on the whole prediction grid; Mask2Former with
        # a BCE cost on random points. Both weigh the costs like the losses.
        matcher = HungarianMatcher(
            cost_class=mf.CLASS_WEIGHT,
            cost_mask=mf.MASK_WEIGHT,
            cost_dice=mf.DICE_WEIGHT,
            num_points=mf.TRAIN_NUM_POINTS if point else 0,
            mask_cost="bce" if point else "focal",
        )
        weight_dict = {
            "loss_ce": mf.CLASS_WEIGHT,
            "loss_mask": mf.MASK_WEIGHT,
            "loss_dice": mf.DICE_WEIGHT,
        }
        if mf.DEEP_SUPERVISION:
            # One auxiliary prediction per decoder layer but the last.
            base = dict(weight_dict)
            for i in range(mf.DEC_LAYERS - 1):
                weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
        return {
            "num_classes": num_classes,
            "matcher": matcher,
            "weight_dict": weight_dict,
            "eos_coef": mf.NO_OBJECT_WEIGHT,
            "losses": ["labels", "masks"],
            "num_points": mf.TRAIN_NUM_POINTS,
            "oversample_ratio": mf.OVERSAMPLE_RATIO,
            "importance_sample_ratio": mf.IMPORTANCE_SAMPLE_RATIO,
            "mask_loss_type": mask_loss_type,
        }

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
            f"mask_loss_type={self.mask_loss_type!r}, num_points={self.num_points}, "
            f"oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}"
        )

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _query_index(
        indices: List[Tuple[Tensor, Tensor]], device: torch.device
    ) -> Tuple[Tensor, Tensor]:
        """(batch index, query index) of the N matched queries, each (N,)."""
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        query_idx = torch.cat([src for src, _ in indices])
        return batch_idx.to(device), query_idx.to(device)

    @staticmethod
    def _matched_target_masks(
        targets: List[Dict[str, Tensor]], indices: List[Tuple[Tensor, Tensor]], device: torch.device
    ) -> Tensor:
        """The N matched target masks, zero-padded to the batch size: float32 (N, [T,] Hm, Wm)."""
        size = batch_mask_size(targets)
        picked = [
            pad_masks(t["masks"][tgt.to(t["masks"].device)], size)
            for t, (_, tgt) in zip(targets, indices)
        ]
        return torch.cat(picked).to(device=device, dtype=torch.float32)

    @staticmethod
    def _average_num_masks(targets: List[Dict[str, Tensor]], device: torch.device) -> float:
        """Target segments per worker, averaged over all workers, at least 1."""
        count = torch.tensor(
            [float(sum(len(t["labels"]) for t in targets))], dtype=torch.float32, device=device
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
        return torch.clamp(count / comm.get_world_size(), min=1.0).item()

    # ------------------------------------------------------------------- losses
    def loss_labels(
        self, outputs: Dict[str, Tensor], targets: Targets, indices: Indices, num_masks: float
    ) -> Dict[str, Tensor]:
        """``loss_ce``: weighted cross entropy of all queries; unmatched ones are no-object."""
        logits = outputs["pred_logits"].float()  # (B, Q, K+1)
        batch_idx, query_idx = self._query_index(indices, logits.device)
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )  # (B, Q)
        matched = [t["labels"][tgt.to(t["labels"].device)] for t, (_, tgt) in zip(targets, indices)]
        target_classes[batch_idx, query_idx] = torch.cat(matched).to(logits.device, torch.int64)
        loss = F.cross_entropy(
            logits.transpose(1, 2),  # (B, K+1, Q): classes on dim 1
            target_classes,
            weight=self.empty_weight.float(),
        )
        return {"loss_ce": loss}

    def loss_masks(
        self, outputs: Dict[str, Tensor], targets: Targets, indices: Indices, num_masks: float
    ) -> Dict[str, Tensor]:
        """``loss_mask`` and ``loss_dice`` of the matched pairs (see ``mask_loss_type``)."""
        pred_masks = outputs["pred_masks"]  # (B, Q, [T,] H, W)
        batch_idx, query_idx = self._query_index(indices, pred_masks.device)
        if batch_idx.numel() == 0:
            # No segment in the batch: a zero that still reaches every mask logit, so all
            # parameters get a (zero) gradient, as DDP requires.
            zero = pred_masks.float().sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        # Frames of a video track are masks of their own: (N*T, Hm, Wm) and (N*T, 1, H, W).
        tgt_masks = self._matched_target_masks(targets, indices, pred_masks.device).flatten(0, -3)
        with torch.autocast(device_type=pred_masks.device.type, enabled=False):
            src_masks = pred_masks[batch_idx, query_idx].float().flatten(0, -3)[:, None]
            if self.mask_loss_type == "point":
                logits, labels = self._point_logits_and_labels(src_masks, tgt_masks)
                loss_mask = sigmoid_bce_loss(logits, labels, num_masks)
            else:
                logits = F.interpolate(
                    src_masks, size=tgt_masks.shape[-2:], mode="bilinear", align_corners=False
                ).flatten(
                    1
                )  # (N, Hm*Wm)
                labels = tgt_masks.flatten(1)  # (N, Hm*Wm)
                loss_mask = sigmoid_focal_loss(
                    logits, labels, num_masks, alpha=self.focal_alpha, gamma=self.focal_gamma
                )
            loss_dice = dice_loss(logits, labels, num_masks)
        return {"loss_mask": loss_mask, "loss_dice": loss_dice}

    def _point_logits_and_labels(
        self, src_masks: Tensor, tgt_masks: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """Importance-sampled points of each matched pair: logits and labels, each (N, P).

        Args:
            src_masks: (N, 1, H, W) float32 predicted logits.
            tgt_masks: (N, Hm, Wm) float32 targets.
        """
        with torch.no_grad():
            # Points are chosen per prediction, mostly where its logit is close to 0; the
            # coordinates are normalised, so predictions need no upsampling.
            coords = get_uncertain_point_coords_with_randomness(
                src_masks,
                point_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )  # (N, P, 2)
            labels = point_sample(tgt_masks[:, None], coords, align_corners=False)[:, 0]  # (N, P)
        logits = point_sample(src_masks, coords, align_corners=False)[:, 0]  # (N, P)
        return logits, labels

    # ------------------------------------------------------------------ forward
    def forward(
        self, outputs: Dict[str, Any], targets: Optional[List[Dict[str, Tensor]]]
    ) -> Dict[str, Tensor]:
        """Computes the unweighted losses.

        Args:
            outputs: ``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, H, W) (video:
                (B, Q, T, H, W)) and optionally ``aux_outputs``, a list of dicts with the same
                two keys.
            targets: B dicts with ``labels`` (G,) int64 in [0, K) and ``masks`` (G, Hm, Wm)
                binary masks (video: (G, T, Hm, Wm) tracks) aligned with the padded input image
                (different sizes are zero-padded at the bottom/right to the largest).

        Returns:
            ``loss_ce``, ``loss_mask``, ``loss_dice`` (as selected by ``losses``) and, for the
            i-th auxiliary output, the same keys with suffix ``_{i}``.
        """
        if targets is None:
            raise ValueError(
                "SetCriterion needs targets: the training inputs must carry 'instances' with "
                "gt_classes and gt_masks"
            )
        num_images = outputs["pred_logits"].shape[0]
        if len(targets) != num_images:
            raise ValueError(f"SetCriterion: {len(targets)} targets for a batch of {num_images}")
        device = outputs["pred_logits"].device
        num_masks = self._average_num_masks(targets, device)

        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        losses = self._losses_of(final, targets, num_masks, suffix="")
        for i, aux in enumerate(outputs.get("aux_outputs") or []):
            losses.update(self._losses_of(aux, targets, num_masks, suffix=f"_{i}"))
        return losses

    def _losses_of(
        self,
        outputs: Dict[str, Tensor],
        targets: List[Dict[str, Tensor]],
        num_masks: float,
        suffix: str,
    ) -> Dict[str, Tensor]:
        """Matches one set of predictions and computes its losses, keys suffixed."""
        indices = self.matcher(outputs, targets)
        losses: Dict[str, Tensor] = {}
        for name in self.losses:
            fn = self.loss_labels if name == "labels" else self.loss_masks
            losses.update(fn(outputs, targets, indices, num_masks))
        return {k + suffix: v for k, v in losses.items()}


def build_criterion(cfg: CfgNode, num_classes: int) -> SetCriterion:
    """The criterion (with its matcher and ``weight_dict``) of the published meta-architecture.

    Reads ``MODEL.MASK_FORMER``: CLASS/MASK/DICE_WEIGHT (loss weights and matching costs),
    NO_OBJECT_WEIGHT, DEEP_SUPERVISION and DEC_LAYERS (``_{i}`` weights for i < DEC_LAYERS - 1),
    TRAIN_NUM_POINTS, OVERSAMPLE_RATIO, IMPORTANCE_SAMPLE_RATIO and MASK_LOSS_TYPE
    ("point" by default, "full" for the original MaskFormer losses).
    """
    return SetCriterion(cfg, num_classes)
