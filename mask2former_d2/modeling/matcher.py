"""Bipartite (Hungarian) matching between mask predictions and ground-truth segments.

Shapes: B batch, Q queries, K classes (+1 = no-object), G ground-truth segments of one image,
P points per mask, H/W prediction mask size, Hm/Wm (padded) target mask size.

The cost of pairing query q with segment t is

    cost_class * (-p_q(c_t)) + cost_mask * BCE(q, t) + cost_dice * dice(q, t)

where p_q is the softmax over the K+1 classes, and the two mask terms are averaged over P points
drawn uniformly at random in [0, 1]^2, shared by every query and segment of the image (the
Mask2Former recipe). With ``num_points=0`` the mask terms use every pixel of the prediction grid
instead, with the targets resized to it (the original MaskFormer recipe, used with
``mask_cost="focal"``).

Video (Mask2Former-VIS): predictions (Q, T, H, W) and targets (G, T, Hm, Wm) of a clip are
matched the same way, with the P points shared by all frames and every cost taken over the
T * P values of a track.
"""

import logging
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

__all__ = [
    "HungarianMatcher",
    "pad_masks",
    "pairwise_dice_cost",
    "pairwise_sigmoid_bce_cost",
    "pairwise_sigmoid_focal_cost",
]

logger = logging.getLogger(__name__)

# Replaces non-finite entries of a cost matrix; far above any real cost (each term is O(1)
# times its weight) yet small enough for float64 sums inside the assignment solver.
_NONFINITE_COST = 1e8


def pad_masks(masks: Tensor, size: Sequence[int]) -> Tensor:
    """Zero-pads (N, [T,] h, w) masks at the bottom and right to (N, [T,] *size).

    Images of a batch are padded the same way, so a target padded to the batch size stays
    aligned with a prediction that covers the padded image.
    """
    h, w = masks.shape[-2:]
    if (h, w) == tuple(size):
        return masks
    assert h <= size[0] and w <= size[1], (masks.shape, size)
    out = masks.new_zeros(masks.shape[:-2] + (size[0], size[1]))
    out[..., :h, :w] = masks
    return out


def batch_mask_size(targets: List[Dict[str, Tensor]]) -> Tuple[int, int]:
    """Largest (height, width) of the target masks over the batch."""
    return (
        max(int(t["masks"].shape[-2]) for t in targets),
        max(int(t["masks"].shape[-1]) for t in targets),
    )


def pairwise_sigmoid_bce_cost(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean sigmoid binary cross entropy of every (prediction, target) pair.

    BCE(x, y) = y * softplus(-x) + (1 - y) * softplus(x), so the pairwise mean is two matrix
    products and no (Q, G, P) tensor is ever built.

    Args:
        logits: (Q, P) mask logits.
        labels: (G, P) target values in [0, 1].

    Returns:
        (Q, G) costs.
    """
    num_points = logits.shape[1]
    pos = F.softplus(-logits)  # (Q, P): -log sigmoid(x), the loss where the label is 1
    neg = F.softplus(logits)  # (Q, P): -log sigmoid(-x), the loss where the label is 0
    cost = pos @ labels.t() + neg @ (1.0 - labels).t()  # (Q, G)
    return cost / num_points


def pairwise_sigmoid_focal_cost(
    logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Mean sigmoid focal loss of every (prediction, target) pair, as two matrix products.

    Exact for 0/1 labels (the focal loss is not linear in a soft label).

    Args:
        logits: (Q, P) mask logits.
        labels: (G, P) target values in [0, 1].
        alpha: weight of the positive term (1 - alpha for the negative one); < 0 disables it.
        gamma: focusing exponent.

    Returns:
        (Q, G) costs.
    """
    num_points = logits.shape[1]
    prob = logits.sigmoid()
    pos = (1.0 - prob).pow(gamma) * F.softplus(-logits)  # (Q, P)
    neg = prob.pow(gamma) * F.softplus(logits)  # (Q, P)
    if alpha >= 0:
        pos = pos * alpha
        neg = neg * (1.0 - alpha)
    cost = pos @ labels.t() + neg @ (1.0 - labels).t()  # (Q, G)
    return cost / num_points


def pairwise_dice_cost(logits: Tensor, labels: Tensor) -> Tensor:
    """Soft dice loss (+1 smoothing) of every (prediction, target) pair.

    Args:
        logits: (Q, P) mask logits.
        labels: (G, P) target values in [0, 1].

    Returns:
        (Q, G) costs in [0, 1].
    """
    prob = logits.sigmoid()
    overlap = prob @ labels.t()  # (Q, G)
    total = prob.sum(-1)[:, None] + labels.sum(-1)[None, :]  # (Q, G)
    return 1.0 - (2.0 * overlap + 1.0) / (total + 1.0)


_MASK_COSTS: Dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "bce": pairwise_sigmoid_bce_cost,
    "focal": pairwise_sigmoid_focal_cost,
}


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth segments, per image.

    There are usually more queries than segments; the unmatched queries are supervised as
    no-object by the criterion. The module has no parameters or buffers.
    """

    def __init__(
        self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0,
        num_points: int = 12544, *, mask_cost: str = "bce",
    ) -> None:
        """
        Args:
            cost_class: weight of the classification cost -p(class).
            cost_mask: weight of the per-pixel mask cost (sigmoid BCE or focal loss).
            cost_dice: weight of the dice cost.
            num_points: number of random points the mask costs are averaged over; 0 uses every
                pixel of the prediction grid, with targets resized (nearest) to it.
            mask_cost: "bce" (Mask2Former) or "focal" (MaskFormer, alpha 0.25, gamma 2).
        """
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_mask and cost_dice are all 0")
        if num_points < 0:
            raise ValueError(f"HungarianMatcher: num_points must be >= 0, got {num_points}")
        if mask_cost not in _MASK_COSTS:
            raise ValueError(
                f"HungarianMatcher: mask_cost must be one of {sorted(_MASK_COSTS)}, got "
                f"{mask_cost!r}"
            )
        self.cost_class = float(cost_class)
        self.cost_mask = float(cost_mask)
        self.cost_dice = float(cost_dice)
        self.num_points = int(num_points)
        self.mask_cost = mask_cost
        self._mask_cost_fn = _MASK_COSTS[mask_cost]
        self._warned_nonfinite = False

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}, "
            f"mask_cost={self.mask_cost!r}"
        )

    def _mask_values(self, pred_masks: Tensor, tgt_masks: Tensor) -> Tuple[Tensor, Tensor]:
        """Mask logits (Q, P) and target values (G, P) at the points the costs average over.

        Args:
            pred_masks: (Q, [T,] H, W) float32 logits (T frames of a clip, if any).
            tgt_masks: (G, [T,] Hm, Wm) float32 targets, padded to the batch size.

        With frames, each row holds the T * P values of a track, frame-major.
        """
        num_pred, num_tgt = pred_masks.shape[0], tgt_masks.shape[0]
        # Queries (and segments, and frames) as channels of a single sample.
        pred = pred_masks.reshape((1, -1) + tuple(pred_masks.shape[-2:]))  # (1, Q*T, H, W)
        tgt = tgt_masks.reshape((1, -1) + tuple(tgt_masks.shape[-2:]))  # (1, G*T, Hm, Wm)
        if self.num_points == 0:
            tgt = F.interpolate(tgt, size=pred.shape[-2:], mode="nearest")
            return pred.reshape(num_pred, -1), tgt.reshape(num_tgt, -1)  # (Q, T*H*W), (G, T*H*W)
        # One set of points for the whole image (clip): one grid_sample call reads every query,
        # segment and frame at the same locations.
        coords = torch.rand(1, self.num_points, 2, device=pred_masks.device)  # (1, P, 2)
        pred = point_sample(pred, coords, align_corners=False)  # (1, Q*T, P)
        tgt = point_sample(tgt, coords, align_corners=False)  # (1, G*T, P)
        return pred.reshape(num_pred, -1), tgt.reshape(num_tgt, -1)  # (Q, T*P), (G, T*P)

    def _finite(self, cost: Tensor) -> Tensor:
        """Replaces NaN/inf entries so the assignment solver always runs."""
        if bool(torch.isfinite(cost).all()):
            return cost
        if not self._warned_nonfinite:
            logger.warning(
                "HungarianMatcher: the matching cost has non-finite values (NaN/inf in "
                "pred_logits or pred_masks?); they are replaced by %g. Training has probably "
                "diverged. This warning is shown once.",
                _NONFINITE_COST,
            )
            self._warned_nonfinite = True
        return torch.nan_to_num(
            cost, nan=_NONFINITE_COST, posinf=_NONFINITE_COST, neginf=-_NONFINITE_COST
        )

    @torch.no_grad()
    def cost_matrix(
        self, pred_logits: Tensor, pred_masks: Tensor, labels: Tensor, tgt_masks: Tensor
    ) -> Tensor:
        """Matching cost of one image, in float32 whatever the autocast state.

        Args:
            pred_logits: (Q, K+1) class logits.
            pred_masks: (Q, H, W) mask logits, or (Q, T, H, W) for a clip of T frames.
            labels: (G,) int64 class ids in [0, K).
            tgt_masks: (G, Hm, Wm) binary masks (or (G, T, Hm, Wm)), already padded to the
                batch size.

        Returns:
            (Q, G) costs; may hold NaN/inf if the predictions do.
        """
        # float32 even under autocast: fp16 sums over thousands of points lose the ranking.
        with torch.autocast(device_type=pred_logits.device.type, enabled=False):
            prob = pred_logits.float().softmax(-1)  # (Q, K+1)
            cost_class = -prob[:, labels]  # (Q, G)
            tgt = tgt_masks.to(device=pred_masks.device, dtype=torch.float32)  # (G, Hm, Wm)
            pred, tgt = self._mask_values(pred_masks.float(), tgt)  # (Q, P), (G, P)
            return (
                self.cost_class * cost_class
                + self.cost_mask * self._mask_cost_fn(pred, tgt)
                + self.cost_dice * pairwise_dice_cost(pred, tgt)
            )

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """Matches each image's queries to its segments.

        Args:
            outputs: ``pred_logits`` (B, Q, K+1) and ``pred_masks`` (B, Q, H, W) logits
                (video: (B, Q, T, H, W)).
            targets: B dicts with ``labels`` (G,) int64 class ids in [0, K) and ``masks``
                (G, Hm, Wm) binary masks (video: (G, T, Hm, Wm) tracks), aligned with the
                (padded) input image; images of different sizes are zero-padded at the
                bottom/right to the largest.

        Returns:
            B pairs ``(pred_idx, tgt_idx)`` of int64 CPU tensors of length min(Q, G): query
            ``pred_idx[i]`` is matched to segment ``tgt_idx[i]``; ``pred_idx`` is increasing.
            An image without segments gets two empty tensors.
        """
        pred_logits = outputs["pred_logits"]
        pred_masks = outputs["pred_masks"]
        if len(targets) != pred_logits.shape[0]:
            raise ValueError(
                f"HungarianMatcher: {len(targets)} targets for a batch of {pred_logits.shape[0]}"
            )
        mask_size = batch_mask_size(targets) if targets else (0, 0)
        indices = []
        for b, target in enumerate(targets):
            labels = target["labels"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            tgt_masks = pad_masks(target["masks"], mask_size)  # (G, Hm, Wm)
            cost = self.cost_matrix(pred_logits[b], pred_masks[b], labels, tgt_masks)
            rows, cols = linear_sum_assignment(self._finite(cost).cpu().numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices
