"""The Mask2Former-VIS meta-architecture: MaskFormer over clips of frames.

Shapes: B clips, T frames, Q queries (one track each), K classes (+1 = no-object), N ground-truth
tracks of a clip, Hp/Wp the padded frame size, Hm/Wm = Hp/4, Wp/4 the mask-logit size, h/w a
frame's own (resized) size, H/W the requested output size.
"""
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList, Instances
from torch import Tensor
from torch.nn import functional as F

from ...accel.layout import is_channels_last
from ...accel.postprocessing import MaskLogitRows
from ..meta_arch import MaskFormer, check_image, gt_mask_tensor
from ..postprocessing import upsample_masks
from .windows import WindowTracks

logger = logging.getLogger(__name__)

__all__ = ["VideoMaskFormer"]


@META_ARCH_REGISTRY.register()
class VideoMaskFormer(MaskFormer):
    """Video instance segmentation: one query per track through the whole clip.

    A batch item is a clip whose ``"image"`` is a list of T (C, H, W) frames; all frames go
    through the backbone and the pixel decoder as images, the transformer decoder
    (:class:`VideoMultiScaleMaskedTransformerDecoder`) attends over all of them at once.

    Training clips also carry ``instances``: T per-frame Instances holding the same N tracks in
    the same order (``gt_classes``, ``gt_ids`` (-1 where absent), ``gt_masks``). Training, input
    checks, the loss and the inference precision are the image model's (hooks of
    :class:`MaskFormer`); training returns the weighted losses of the criterion (the image one: a
    clip's masks are (N, T, H, W), points are shared by the frames of a clip). Inference takes one clip and
    returns the published per-video dict: ``image_size``, ``pred_scores``, ``pred_labels`` and
    ``pred_masks`` (the ``test_topk_per_video`` best (query, class) pairs, best first; boolean
    (T, H, W) masks). Beyond the published model, inference runs the backbone and pixel decoder
    over ``frame_chunk_size`` frames at a time and makes the full-resolution masks one frame at a
    time (same outputs, memory not dominated by T x full-size masks), and can process long
    clips in overlapping windows (``window_size`` > 0; changes outputs, see
    :class:`~.windows.WindowTracks`).
    """

    @configurable
    def __init__(
        self,
        *,
        num_frames: int,
        frame_chunk_size: int = 0,
        test_topk_per_video: int = 10,
        window_size: int = 0,
        window_overlap: int = 0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            num_frames: frames per training clip (``INPUT.SAMPLING_FRAME_NUM``).
            frame_chunk_size: inference runs the backbone and pixel decoder over this many
                frames at a time; <= 0 runs all frames at once. Outputs do not depend on it.
            test_topk_per_video: predictions kept per video (10 as published).
            window_size: > 0 decodes the clip in windows of this many frames whose tracks are
                associated on the overlapping frames (changes outputs); 0 decodes the whole clip.
            window_overlap: frames shared by consecutive windows (0 <= overlap < window_size).
            kwargs: as for :class:`MaskFormer` (its semantic/panoptic/instance flags are unused).
        """
        kwargs.setdefault("semantic_on", False)
        kwargs.setdefault("instance_on", True)
        super().__init__(**kwargs)
        if num_frames < 1:
            raise ValueError(f"INPUT.SAMPLING_FRAME_NUM must be >= 1, got {num_frames}")
        if test_topk_per_video < 1:
            raise ValueError(f"test_topk_per_video must be >= 1, got {test_topk_per_video}")
        if window_size < 0 or (window_size and not 0 <= window_overlap < window_size):
            raise ValueError(
                "MODEL.MASK_FORMER.TEST.WINDOW_SIZE must be >= 0 and WINDOW_OVERLAP in "
                f"[0, WINDOW_SIZE); got WINDOW_SIZE={window_size}, WINDOW_OVERLAP={window_overlap}"
            )
        self.num_frames = num_frames
        self.frame_chunk_size = frame_chunk_size
        self.test_topk_per_video = test_topk_per_video
        self.window_size = window_size
        self.window_overlap = window_overlap

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict[str, Any]:
        ret = super().from_config(cfg)
        test = cfg.MODEL.MASK_FORMER.TEST
        # Video inference gives per-video instances only (as published), whatever these say.
        ret.update(semantic_on=False, panoptic_on=False, instance_on=True)
        ret["sem_seg_postprocess_before_inference"] = True
        del ret["test_topk_per_image"]
        ret.update(
            num_frames=cfg.INPUT.SAMPLING_FRAME_NUM,
            frame_chunk_size=test.FRAME_CHUNK_SIZE,
            test_topk_per_video=test.TOPK_PER_VIDEO,
            window_size=test.WINDOW_SIZE,
            window_overlap=test.WINDOW_OVERLAP,
        )
        return ret

    # ------------------------------------------------------------------ inputs
    def _input_images(self, batched_inputs: List[Dict[str, Any]]) -> List[Tensor]:
        """All frames of the batch, clip-major, checked: list of (C, H, W) tensors."""
        channels = self.pixel_mean.shape[0]
        frames = []
        for i, video in enumerate(batched_inputs):
            clip = video.get("image") if isinstance(video, dict) else None
            if not isinstance(clip, (list, tuple)) or not clip:
                raise ValueError(
                    f"batched_inputs[{i}]['image'] must be a non-empty list of ({channels}, H, W) "
                    f"frames; got {type(clip).__name__}"
                )
            frames += [check_image(f, channels, f"batched_inputs[{i}]['image'][{t}]") for t, f in enumerate(clip)]
        return frames

    def _padded_size(self, frames: Sequence[Tensor]) -> Tuple[int, int]:
        """(Hp, Wp): the largest frame size rounded up to ``size_divisibility``."""
        h = max(int(f.shape[-2]) for f in frames)
        w = max(int(f.shape[-1]) for f in frames)
        d = self.size_divisibility
        if d > 1:
            h, w = -(-h // d) * d, -(-w // d) * d
        return h, w

    # ----------------------------------------------------------------- forward
    def inference(self, batched_inputs: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Eval-mode output of a single clip (optionally with the output ``height`` and
        ``width``): ``image_size`` (H, W), ``pred_scores`` and ``pred_labels`` (lists) and
        ``pred_masks`` (list of boolean (T, H, W) tensors)."""
        frames = self._input_images(batched_inputs)
        if len(batched_inputs) != 1:
            raise ValueError(
                f"VideoMaskFormer inference takes one video per batch; got {len(batched_inputs)}"
            )
        video = batched_inputs[0]
        image_size = (int(frames[0].shape[-2]), int(frames[0].shape[-1]))
        if any(tuple(f.shape[-2:]) != image_size for f in frames):
            raise ValueError("VideoMaskFormer inference: all frames of a video must have the same size")
        out_size = (int(video.get("height", image_size[0])), int(video.get("width", image_size[1])))
        padded_size = self._padded_size(frames)
        if self.window_size and len(frames) > self.window_size:
            return self._inference_windows(frames, padded_size, image_size, out_size)
        mask_cls, embed, mask_features = self._decode_clip(frames, padded_size)

        def frame_logits(queries: Tensor, t: int) -> Tensor:
            return torch.einsum("pe,ehw->phw", embed[queries], mask_features[t].to(embed.dtype))

        return self.inference_video(mask_cls, frame_logits, len(frames), padded_size, image_size, out_size)

    def _decode_clip(self, frames: Sequence[Tensor], padded_size: Tuple[int, int]) -> Tuple[Tensor, Tensor, Tensor]:
        """One clip through the model: class logits (Q, K+1), final mask embeddings (Q, E) and
        mask features (T, E, Hm, Wm) (mask logits = their product, made only for the queries
        kept; in the inference precision, the rest float32). The backbone and pixel decoder run
        over ``frame_chunk_size`` frames at a time, their outputs written into clip-long
        buffers."""
        num = len(frames)
        chunk = self.frame_chunk_size if self.frame_chunk_size > 0 else num
        head = self.sem_seg_head
        x = mask_features = None
        with self.inference_precision():
            for start in range(0, num, chunk):
                part = frames[start : start + chunk]
                batch = self.pixel_mean.new_zeros((len(part), self.pixel_mean.shape[0]) + tuple(padded_size))
                for i, f in enumerate(part):
                    batch[i, :, : f.shape[-2], : f.shape[-1]] = self._normalize(f)
                x_part, mf_part = head.decoder_inputs(self.backbone(self._backbone_input(batch)))
                del batch
                if chunk >= num:
                    x, mask_features = x_part, mf_part
                    del x_part, mf_part
                    break
                x = _write_frames(x, x_part, start, num)
                mask_features = _write_frames(mask_features, mf_part, start, num)
                del x_part, mf_part
            # Handed over without a reference kept here, so the decoder can free the level maps.
            levels = [x]
            del x
            outputs = head.predictor(levels.pop(), mask_features, final_masks=False)
        return outputs["pred_logits"][0].float(), outputs["pred_mask_embed"][0].float(), mask_features

    def inference_video(
        self,
        mask_cls: Tensor,
        frame_logits: Callable[[Tensor, int], Tensor],
        num_frames: int,
        padded_size: Tuple[int, int],
        image_size: Tuple[int, int],
        out_size: Tuple[int, int],
    ) -> Dict[str, Any]:
        """The published per-video output from (Q, K+1) class logits and
        ``frame_logits(queries, t)``, the (P, Hm, Wm) mask logits of the given queries in frame
        t: the best (query, class) pairs over the flattened Q x K softmax scores (no-object
        dropped), their masks upsampled to the padded size, cropped to the frame, resized to
        ``out_size`` and thresholded at 0, one frame at a time."""
        num_classes = self.sem_seg_head.num_classes
        scores = F.softmax(mask_cls.float(), dim=-1)[:, :-1]  # (Q, K)
        k = min(self.test_topk_per_video, scores.numel())
        top_scores, top_idx = scores.flatten().topk(k)
        labels = top_idx % num_classes
        queries = top_idx // num_classes
        masks = _video_masks(frame_logits, queries, num_frames, padded_size, image_size, out_size, self.fast_paths)
        return {
            "image_size": out_size,
            "pred_scores": top_scores.tolist(),
            "pred_labels": labels.tolist(),
            "pred_masks": list(masks.unbind(0)),
        }

    def _inference_windows(
        self,
        frames: Sequence[Tensor],
        padded_size: Tuple[int, int],
        image_size: Tuple[int, int],
        out_size: Tuple[int, int],
    ) -> Dict[str, Any]:
        """Windowed inference (``window_size`` > 0): see :class:`~.windows.WindowTracks`."""
        tracks = WindowTracks(len(frames), self.window_size, self.window_overlap)
        for start, stop in tracks.windows():
            mask_cls, embed, mask_features = self._decode_clip(frames[start:stop], padded_size)
            tracks.add(start, mask_cls, torch.einsum("qe,tehw->qthw", embed, mask_features.to(embed.dtype)))
            del mask_features
        return self.inference_video(
            tracks.class_logits(), tracks.frame_logits, len(frames), padded_size, image_size, out_size
        )

    # ----------------------------------------------------------------- targets
    def prepare_targets(self, batched_inputs: List[Dict[str, Any]], images: ImageList) -> List[Dict[str, Tensor]]:
        """Per clip ``labels`` (N,), ``ids`` (N, T) and ``masks`` (N, T, Hp, Wp) bool from the
        mapper's per-frame Instances; tracks absent from every frame are dropped."""
        h_pad, w_pad = images.tensor.shape[-2:]
        out = []
        for i, video in enumerate(batched_inputs):
            per_frame: Optional[List[Instances]] = video.get("instances")
            if not per_frame or len(per_frame) != len(video["image"]):
                raise ValueError(
                    f"batched_inputs[{i}]['instances'] must be a list of one Instances per frame "
                    f"({len(video['image'])}); got {type(per_frame).__name__}"
                )
            num = len(per_frame[0])
            masks = torch.zeros((num, len(per_frame), h_pad, w_pad), dtype=torch.bool, device=self.device)
            ids = []
            for t, inst in enumerate(per_frame):
                if len(inst) != num:
                    raise ValueError(
                        f"batched_inputs[{i}]['instances'][{t}] has {len(inst)} tracks, frame 0 has {num}; "
                        "every frame must hold all tracks of the clip (gt_ids -1 where absent)"
                    )
                m = gt_mask_tensor(inst.gt_masks, f"batched_inputs[{i}]['instances'][{t}]")
                masks[:, t, : m.shape[-2], : m.shape[-1]] = m.to(self.device, torch.bool)
                ids.append(inst.gt_ids.to(self.device))
            ids = torch.stack(ids, dim=1) if ids else torch.zeros((num, 0), dtype=torch.long)  # (N, T)
            valid = (ids != -1).any(dim=1)
            out.append(
                {
                    "labels": per_frame[0].gt_classes.to(self.device)[valid],
                    "ids": ids[valid],
                    "masks": masks[valid],
                }
            )
        return out


def _write_frames(buffer: Any, part: Any, start: int, total: int) -> Any:
    """Copies a chunk's per-frame outputs (a tensor or a list of them) into frames
    [start, start + len) of clip-long buffers of ``total`` frames, allocated on first use."""
    if isinstance(part, (list, tuple)):
        buffer = buffer if buffer is not None else [None] * len(part)
        return [_write_frames(b, p, start, total) for b, p in zip(buffer, part)]
    if buffer is None:
        # In the chunk's memory layout, so that later steps see what an unchunked run sees.
        layout = torch.channels_last if is_channels_last(part) else torch.contiguous_format
        buffer = torch.empty((total,) + tuple(part.shape[1:]), dtype=part.dtype, device=part.device,
                             memory_format=layout)
    buffer[start : start + part.shape[0]] = part
    return buffer


def _video_masks(
    frame_logits: Callable[[Tensor, int], Tensor],
    queries: Tensor,
    num_frames: int,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    out_size: Tuple[int, int],
    fast_paths: bool,
) -> Tensor:
    """(P, T, H, W) bool masks of the P ``queries``: logit > 0 after the published resize chain
    (:func:`~..postprocessing.upsample_masks`, or its banded form with ``fast_paths``); only one
    frame's full-resolution logits exist at a time."""
    out = torch.empty((len(queries), num_frames) + tuple(out_size), dtype=torch.bool, device=queries.device)
    for t in range(num_frames):
        low = frame_logits(queries, t)  # (P, Hm, Wm)
        if fast_paths:
            rows = MaskLogitRows(low, padded_size, image_size, out_size).rows(0, out_size[0])  # (H, W, P)
            out[:, t] = (rows > 0).permute(2, 0, 1)
        else:
            out[:, t] = upsample_masks(low, padded_size, image_size, out_size) > 0
    return out
