"""Semantic, panoptic and instance outputs computed a band of output rows at a time.

The outputs are those of :mod:`mask2former_d2.modeling.postprocessing` (the reference
formulation, which holds whole (Q, H, W) tensors); tests hold the two equal.

Shapes: Q queries, K classes (K+1 with no-object), h/w the mask-logit size, Hp/Wp the padded
batch size, H/W the output resolution. ``mask_cls`` are class logits (Q, K+1).

Why bands: full-resolution mask logits are never held whole. :class:`MaskLogitRows` produces them
a band of rows at a time, straight from the 1/4-resolution predictions, and each output
accumulates what it needs from every band. A (Q, H, W) float tensor is ~430 MB at 800x1333 with
100 queries; the reference makes several of them per image (upsampled logits, sigmoid, weighted
probabilities, gathered copies), and at that size the page faults of fresh allocations cost as
much as the arithmetic. Bands of a few MB stay in the allocator and in cache.

Bands are query-last, (rows, W, Q): the bilinear upsampling of a channels-last map is then
vectorised over the queries, the panoptic argmax over queries reduces contiguous memory, the
semantic output is one matrix product with a transposed operand, and only the instance masks need
a (cheap, boolean) transpose. Python loops run over bands and pixel blocks, over the few kept
panoptic segments (on values already moved to the host) and, on the CPU only, over the instance
masks to copy them in score order; none syncs a device.
"""
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.structures import Boxes, Instances
from torch import Tensor
from torch.nn import functional as F

from ..modeling.postprocessing import assign_segments, boxes_from_projections

__all__ = ["BAND_ELEMENTS", "SEMANTIC_PIXELS", "MaskLogitRows", "postprocess_masks", "semantic_labels"]

# Elements of (rows, W, Q) per band: 2M floats (8 MB), so that a band's logits, probabilities
# and temporaries stay mostly in a CPU's last-level cache, and every band buffer is far below
# glibc's largest mmap threshold (32 MB): reused, not faulted in again. Chosen by timing band
# sizes from 4 to 32 MB at 800x1333 with 100 queries (benchmarks/bench_inference.py).
BAND_ELEMENTS = 1 << 21
# Pixels per matrix product of the semantic output: a (K, Q) @ (Q, pixels) product with small Q
# runs faster when its operands stay in cache.
SEMANTIC_PIXELS = 1 << 11


def _band_rows(num_queries: int, height: int, width: int, band_elements: int) -> int:
    return max(1, min(height, band_elements // max(1, num_queries * width)))


def _linear_taps(in_size: int, out_size: int, device) -> Tuple[Tensor, Tensor, Tensor]:
    """Source rows and weights of a bilinear (``align_corners=False``) resize along one axis,
    computed in float32 as PyTorch's kernel does: ``src = (dst + 0.5) * in/out - 0.5``, clamped
    at 0; returns (i0, i1, w1) with ``out = x[i0] * (1 - w1) + x[i1] * w1``."""
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    src = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    i0 = src.long()
    i1 = (i0 + 1).clamp(max=in_size - 1)
    w1 = src - i0
    return i0.to(device), i1.to(device), w1.to(device)


class MaskLogitRows:
    """Full-resolution mask logits of one image, a band of output rows at a time.

    Equivalent to upsampling ``low`` bilinearly to the padded batch size, cropping the image's
    own ``image_size`` and resizing bilinearly to ``output_size`` (Detectron2's
    ``sem_seg_postprocess``; the reference is
    :func:`~mask2former_d2.modeling.postprocessing.upsample_masks`). When the padded size is a
    power-of-two multiple of ``low``'s (always, for stride-4 mask features and a padded batch), each band of
    the first upsampling is computed from a slice of ``low`` with one row of margin: the same
    source rows and weights as the whole-image resize (bit-identical in float64; PyTorch's
    float32 kernel rounds a few ulps differently for short inputs). Otherwise the whole image is
    upsampled once. The second resize, when the output size differs, is done separably from
    global source indices (equal to PyTorch's up to float rounding).

    Args:
        low: (Q, h, w) mask logits of one image (the head's ``pred_masks[i]``), any layout.
        padded_size: (Hp, Wp) of the padded batch the model saw.
        image_size: (h, w) of this image inside the padded batch.
        output_size: (H, W) requested for the outputs.

    ``rows(r0, r1)`` returns the band query-last: (r1 - r0, W, Q).
    """

    def __init__(
        self,
        low: Tensor,
        padded_size: Tuple[int, int],
        image_size: Tuple[int, int],
        output_size: Tuple[int, int],
    ):
        self.low = low
        # Channels-last (1, Q, h, w): resized bands come out query-last (see the module doc).
        self._low = low[None].contiguous(memory_format=torch.channels_last)
        self.padded_size = (int(padded_size[0]), int(padded_size[1]))
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.shape = (low.shape[0], int(output_size[0]), int(output_size[1]))
        self.dtype, self.device = low.dtype, low.device
        hp, lh = self.padded_size[0], low.shape[-2]
        factor = hp // lh if hp % lh == 0 else 0
        self._factor = factor if factor > 0 and factor & (factor - 1) == 0 else 0
        self._full: Optional[Tensor] = None
        if not self._factor:
            full = F.interpolate(
                self._low, size=self.padded_size, mode="bilinear", align_corners=False
            )
            self._full = _query_last(full)  # (Hp, Wp, Q)
        h, w = self.image_size
        out_h, out_w = self.shape[1:]
        self._rows = _linear_taps(h, out_h, low.device) if h != out_h else None
        self._resize_width = w != out_w

    def _image_rows(self, a: int, b: int) -> Tensor:
        """Rows [a, b) of the upsampled, cropped logits, query-last: (b - a, w, Q)."""
        w = self.image_size[1]
        if self._full is not None:
            return self._full[a:b, :w]
        f, lh = self._factor, self.low.shape[-2]
        # Output row r reads input rows around (r + 0.5) / f - 0.5; one row of margin either
        # side keeps the band's own edge clamping away from the rows that are kept.
        in0 = max(a // f - 1, 0)
        in1 = min(-(-b // f) + 1, lh)
        up = F.interpolate(
            self._low[:, :, in0:in1],
            size=((in1 - in0) * f, self.padded_size[1]),
            mode="bilinear",
            align_corners=False,
        )
        return _query_last(up)[a - in0 * f : b - in0 * f, :w]

    def rows(self, r0: int, r1: int) -> Tensor:
        """(r1 - r0, W, Q) mask logits of output rows [r0, r1)."""
        if self._rows is None:
            x = self._image_rows(r0, r1)
        else:
            i0, i1, w1 = (t[r0:r1] for t in self._rows)
            s0, s1 = int(i0[0]), int(i1[-1]) + 1
            x = self._image_rows(s0, s1)
        if self._resize_width:
            # As a channels-last (1, Q, rows, w) map (made dense: the crop is not).
            x = x.contiguous().permute(2, 0, 1)[None]
            x = _query_last(F.interpolate(x, size=(x.shape[2], self.shape[2]), mode="bilinear",
                                          align_corners=False))
        if self._rows is not None:
            w1 = w1.to(x.dtype).view(-1, 1, 1)
            x = x.index_select(0, i0 - s0) * (1 - w1) + x.index_select(0, i1 - s0) * w1
        return x


def _query_last(x: Tensor) -> Tensor:
    """(1, Q, H, W) -> (H, W, Q), a view (contiguous for a channels-last ``x``)."""
    return x[0].permute(1, 2, 0)


class _TensorRows:
    """A whole (Q, H, W) logit tensor behind :class:`MaskLogitRows`'s interface."""

    def __init__(self, logits: Tensor):
        self.logits = logits
        self.shape = tuple(logits.shape)
        self.dtype, self.device = logits.dtype, logits.device

    def rows(self, r0: int, r1: int) -> Tensor:
        return self.logits[:, r0:r1].permute(1, 2, 0)  # (rows, W, Q)


class _Semantic:
    """``sum_q p_q(c) * sigmoid(m_q)``: (K, H, W) probabilities (not logits)."""

    def __init__(self, mask_cls: Tensor, shape, dtype, pixels: int):
        _, h, w = shape
        self.cls_prob_t = F.softmax(mask_cls, dim=-1)[:, :-1].t().contiguous().to(dtype)  # (K, Q)
        self.out = self._new_output(h, w, dtype)
        self.step = max(1, pixels // max(w, 1))

    def _new_output(self, h: int, w: int, dtype) -> Tensor:
        return self.cls_prob_t.new_empty((self.cls_prob_t.shape[0], h, w), dtype=dtype)

    def update(self, r0, r1, logits, prob):
        q = prob.shape[2]
        for a in range(0, r1 - r0, self.step):
            b = min(r1 - r0, a + self.step)
            # The query-last probabilities of rows [a, b) are the transposed operand.
            self._block(r0 + a, r0 + b, prob[a:b].reshape(-1, q).t())

    def _block(self, r0: int, r1: int, prob_t: Tensor) -> None:
        # Rows [r0, r1) of every class are one (K, rows*W) block with row stride H*W, written in
        # place by BLAS.
        k = self.out.shape[0]
        torch.mm(self.cls_prob_t, prob_t, out=self.out[:, r0:r1].view(k, -1))

    def finish(self) -> Tensor:
        return self.out


class _SemanticLabels(_Semantic):
    """The argmax over classes of :class:`_Semantic`'s probabilities, (H, W) int64 class ids;
    only one block of the probabilities exists at a time."""

    def _new_output(self, h: int, w: int, dtype) -> Tensor:
        return torch.empty((h, w), dtype=torch.int64, device=self.cls_prob_t.device)

    def _block(self, r0: int, r1: int, prob_t: Tensor) -> None:
        self.out[r0:r1] = torch.mm(self.cls_prob_t, prob_t).argmax(0).view(r1 - r0, -1)


def semantic_labels(
    sem_seg: Tensor, output_size: Tuple[int, int], *, band_elements: int = BAND_ELEMENTS
) -> Tensor:
    """``sem_seg_postprocess``-style bilinear resize of (K, h, w) probabilities to
    ``output_size`` followed by the argmax over classes, a band of output rows at a time: (H, W)
    int64 class ids, without the (K, H, W) probabilities (ties and float rounding aside, equal to
    ``resize(sem_seg).argmax(0)``)."""
    k, h, w = sem_seg.shape
    if (h, w) == tuple(output_size):
        return sem_seg.argmax(0)
    rows = MaskLogitRows(sem_seg, (h, w), (h, w), output_size)
    out = torch.empty(tuple(output_size), dtype=torch.int64, device=sem_seg.device)
    step = _band_rows(k, output_size[0], output_size[1], band_elements)
    for r0 in range(0, output_size[0], step):
        r1 = min(output_size[0], r0 + step)
        out[r0:r1] = rows.rows(r0, r1).argmax(-1)
    return out


class _Panoptic:
    """:func:`~mask2former_d2.modeling.postprocessing.panoptic_inference`, accumulated band by
    band."""

    def __init__(self, mask_cls, shape, *, num_classes, thing_ids, object_mask_threshold,
                 overlap_threshold):
        q, h, w = shape
        scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
        keep = labels.ne(num_classes) & (scores > object_mask_threshold)
        self.keep = keep.nonzero().squeeze(1)
        self.n = int(self.keep.numel())
        self.all_kept = self.n == q
        self.scores = scores[self.keep]
        self.classes = labels[self.keep]
        self.thing_ids = thing_ids
        self.overlap_threshold = overlap_threshold
        device = mask_cls.device
        self.winner = torch.zeros((h, w), dtype=torch.int64, device=device)
        self.confident = torch.zeros((h, w), dtype=torch.bool, device=device)
        self.won = torch.zeros(self.n, dtype=torch.int64, device=device)
        self.own = torch.zeros(self.n, dtype=torch.int64, device=device)
        self.seg = torch.zeros(self.n, dtype=torch.int64, device=device)

    def update(self, r0, r1, logits, prob):
        if self.n == 0:
            return
        p = prob if self.all_kept else prob.index_select(2, self.keep)  # (rows, W, n)
        winner = (p * self.scores.to(p.dtype)).argmax(-1)  # (rows, W): the winning query
        # A pixel belongs to its winner's segment only where the winner's own probability is
        # >= 0.5.
        confident = p.gather(2, winner.unsqueeze(2)).squeeze(2) >= 0.5
        self.winner[r0:r1] = winner
        self.confident[r0:r1] = confident
        self.won += torch.bincount(winner.flatten(), minlength=self.n)
        self.own += (p >= 0.5).sum((0, 1), dtype=torch.int32)
        self.seg += torch.bincount(winner[confident], minlength=self.n)

    def finish(self) -> Tuple[Tensor, List[Dict]]:
        if self.n == 0:
            return torch.zeros(self.winner.shape, dtype=torch.int32, device=self.winner.device), []
        # The segment bookkeeping needs a handful of scalars per query: one transfer.
        classes, won, own, seg = torch.stack([self.classes, self.won, self.own, self.seg]).tolist()
        segment_of_query, segments_info = assign_segments(
            classes, list(zip(won, own, seg)), self.thing_ids, self.overlap_threshold
        )
        lut = torch.tensor(segment_of_query, dtype=torch.int32, device=self.winner.device)
        # where(confident, lut[winner], 0) with a single (H, W) int32 tensor.
        panoptic_seg = lut[self.winner]
        panoptic_seg.masked_fill_(self.confident.logical_not_(), 0)
        return panoptic_seg, segments_info


class _Instance:
    """:func:`~mask2former_d2.modeling.postprocessing.instance_inference`, accumulated band by
    band."""

    def __init__(self, mask_cls, shape, *, num_classes, topk, thing_ids, things_only):
        q, h, w = shape
        cls_prob = F.softmax(mask_cls, dim=-1)[:, :-1]  # (Q, K)
        topk = min(topk, cls_prob.numel())
        top_scores, top_idx = cls_prob.flatten().topk(topk, sorted=True)
        labels = top_idx % num_classes
        query = torch.div(top_idx, num_classes, rounding_mode="floor")
        if things_only:
            things = torch.as_tensor(list(thing_ids), dtype=labels.dtype, device=labels.device)
            keep = torch.isin(labels, things)
            top_scores, labels, query = top_scores[keep], labels[keep], query[keep]
        self.top_scores, self.labels = top_scores.float(), labels
        # Mask statistics depend only on the query: gather them for the queries used, once each.
        self.used, self.inverse = torch.unique(query, return_inverse=True)
        u = int(self.used.numel())
        self.all_used = u == q  # unique() sorts, so `used` is then arange(Q)
        device = mask_cls.device
        self.image_size = (h, w)
        self.masks = torch.empty((u, h, w), dtype=torch.bool, device=device)
        self.area = torch.zeros(u, dtype=torch.int64, device=device)
        self.inside = torch.zeros(u, dtype=torch.float32, device=device)
        self.row_hit = torch.zeros((u, h), dtype=torch.bool, device=device)
        self.col_hit = torch.zeros((u, w), dtype=torch.bool, device=device)

    def update(self, r0, r1, logits, prob):
        if self.used.numel() == 0:
            return
        if not self.all_used:
            logits, prob = logits.index_select(2, self.used), prob.index_select(2, self.used)
        binary = logits > 0  # (rows, W, U)
        self.masks[:, r0:r1] = binary.permute(2, 0, 1)
        self.area += binary.sum((0, 1), dtype=torch.int32)
        self.inside += torch.where(binary, prob, 0.0).sum((0, 1), dtype=torch.float32)
        # A row/column holds mask pixels iff its largest logit is > 0: reductions of the float
        # logits are much faster than of the boolean mask.
        self.row_hit[:, r0:r1] = (logits.amax(1) > 0).t()
        self.col_hit |= (logits.amax(0) > 0).t()

    def finish(self) -> Instances:
        mask_score = self.inside / (self.area + 1e-6)  # (U,)
        boxes = boxes_from_projections(self.row_hit, self.col_hit)
        scores = self.top_scores * mask_score[self.inverse]
        order = scores.argsort(descending=True)
        inverse = self.inverse[order]
        result = Instances(self.image_size)
        result.pred_masks = _take_masks(self.masks, inverse)
        result.pred_boxes = Boxes(boxes[inverse])
        result.scores = scores[order]
        result.pred_classes = self.labels[order]
        return result


def _take_masks(masks: Tensor, index: Tensor) -> Tensor:
    """``masks[index]`` for (N, H, W) masks that the caller gives up: on the CPU one contiguous
    copy per mask (a boolean ``index_select`` of whole planes runs element by element), in place
    when ``index`` is a permutation (no second mask tensor, one plane of scratch space)."""
    if masks.device.type != "cpu":
        return masks[index]
    order = index.tolist()
    n = masks.shape[0]
    if len(order) == n and sorted(order) == list(range(n)):
        return _permute_planes_(masks, order)
    out = masks.new_empty((len(order),) + tuple(masks.shape[1:]))
    for dst, src in enumerate(order):
        out[dst].copy_(masks[src])
    return out


def _permute_planes_(x: Tensor, order: List[int]) -> Tensor:
    """``x[:] = x[order]`` in place, following the permutation's cycles."""
    scratch = None
    done = [False] * len(order)
    for start in range(len(order)):
        if done[start] or order[start] == start:
            continue
        if scratch is None:
            scratch = x.new_empty(x.shape[1:])
        scratch.copy_(x[start])
        dst = start
        while order[dst] != start:
            x[dst].copy_(x[order[dst]])
            done[dst] = True
            dst = order[dst]
        x[dst].copy_(scratch)
        done[dst] = True
    return x


def _run(source, outputs: Dict[str, object], band_elements: int) -> Dict[str, object]:
    """Feed every band of ``source`` (query-last logits and their sigmoid) to each output
    accumulator."""
    q, h, w = source.shape
    step = _band_rows(q, h, w, band_elements)
    for r0 in range(0, h, step):
        r1 = min(h, r0 + step)
        logits = source.rows(r0, r1)
        prob = logits.sigmoid()  # one sigmoid serves all three outputs
        for acc in outputs.values():
            acc.update(r0, r1, logits, prob)
    return {k: acc.finish() for k, acc in outputs.items()}


def postprocess_masks(
    mask_cls: Tensor,
    masks,
    *,
    semantic: bool = False,
    panoptic: Optional[Dict] = None,
    instance: Optional[Dict] = None,
    semantic_labels: bool = False,
    band_elements: int = BAND_ELEMENTS,
    semantic_pixels: int = SEMANTIC_PIXELS,
) -> Dict[str, object]:
    """Semantic, panoptic and instance outputs of one image in a single pass over its masks.

    Args:
        mask_cls: (Q, K+1) class logits.
        masks: a :class:`MaskLogitRows` or a (Q, H, W) tensor of mask logits.
        semantic: compute ``sem_seg`` (see :func:`~mask2former_d2.modeling.postprocessing.semantic_inference`).
        panoptic: keyword arguments of :func:`~mask2former_d2.modeling.postprocessing.panoptic_inference`
            to compute ``panoptic_seg``.
        instance: keyword arguments of :func:`~mask2former_d2.modeling.postprocessing.instance_inference`
            to compute ``instances``.
        semantic_labels: with ``semantic``, ``sem_seg`` is the (H, W) int64 argmax over classes
            of the probabilities instead, computed without holding them (for callers that only
            draw or store the labels, e.g. on large images).
        band_elements: elements of a (rows, W, Q) band (a tuning constant: outputs do not depend
            on it).
        semantic_pixels: pixels per matrix product of the semantic output (likewise).

    Returns:
        dict with the requested ``sem_seg``, ``panoptic_seg`` and ``instances``.
    """
    source = _TensorRows(masks) if isinstance(masks, Tensor) else masks
    mask_cls = mask_cls.to(source.device)
    outputs: Dict[str, object] = {}
    if semantic:
        semantic_cls = _SemanticLabels if semantic_labels else _Semantic
        outputs["sem_seg"] = semantic_cls(mask_cls, source.shape, source.dtype, semantic_pixels)
    if panoptic is not None:
        outputs["panoptic_seg"] = _Panoptic(mask_cls, source.shape, **panoptic)
    if instance is not None:
        outputs["instances"] = _Instance(mask_cls, source.shape, **instance)
    return _run(source, outputs, band_elements)
