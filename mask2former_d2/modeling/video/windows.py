"""Windowed inference for long videos: tracks of overlapping windows associated into one set.

Whole-clip inference (the default, as published) decodes every frame with one set of queries; its
memory grows with the clip length (all frames' mask features at once). Windowed inference
(``MODEL.MASK_FORMER.TEST.WINDOW_SIZE`` > 0) decodes windows of W frames that overlap by O frames
and links them: the queries of a new window are assigned one-to-one to the tracks so far by the
soft dice similarity of their mask probabilities on the shared frames (on the last and first frames
when O = 0), Hungarian-matched. A track's mask logits on shared frames are the mean of the two
windows', its class probabilities the mean over the windows. This changes the outputs (each window
sees only its own frames, with a time encoding over the window), so it is an option, not the
default. Memory: one window through the model plus the tracks' low-resolution mask logits, kept
as float16 (Q x Hm x Wm x 2 bytes per frame; the rounding keeps every logit's sign, and only
border pixels whose upsampled logit lies within the rounding of 0 can change).

Shapes: Q queries, K classes (+1 = no-object), T frames of the video, W frames of a window,
Hm/Wm the mask-logit size.
"""
from typing import Iterator, Optional, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["WindowTracks", "window_bounds"]

# How the tracks' mask logits are stored between windows: half the memory of float32.
STORAGE_DTYPE = torch.float16


def window_bounds(num_frames: int, window: int, overlap: int) -> Iterator[Tuple[int, int]]:
    """[start, stop) of the windows: W frames each, consecutive ones sharing ``overlap`` frames,
    the last one ending at the last frame (shorter if the stride does not divide the rest)."""
    if window < 1 or not 0 <= overlap < window:
        raise ValueError(f"window_bounds: need window >= 1 and 0 <= overlap < window; got {window}, {overlap}")
    start = 0
    while True:
        stop = min(start + window, num_frames)
        yield start, stop
        if stop >= num_frames:
            return
        start = stop - overlap


def _soft_dice(a: Tensor, b: Tensor) -> Tensor:
    """(Q, Q') soft dice similarity of (Q, P) and (Q', P) probabilities."""
    inter = a @ b.t()
    return 2 * inter / (a.sum(1)[:, None] + b.sum(1)[None, :] + 1e-6)


class WindowTracks:
    """Accumulates the windows of one video (in order) into Q tracks.

    Args:
        num_frames: T, frames of the video.
        window: W, frames per window.
        overlap: frames shared by consecutive windows.
    """

    def __init__(self, num_frames: int, window: int, overlap: int) -> None:
        self.num_frames = num_frames
        self.window = window
        self.overlap = overlap
        self._masks: Optional[Tensor] = None  # (Q, T, Hm, Wm) float16 mask logits of the tracks
        self._probs: Optional[Tensor] = None  # (Q, K+1) sum of the windows' class probabilities
        self._windows = 0
        self._filled = 0  # frames [0, filled) hold logits

    def windows(self) -> Iterator[Tuple[int, int]]:
        """[start, stop) of the windows to decode, in the order :meth:`add` expects them."""
        return window_bounds(self.num_frames, self.window, self.overlap)

    def add(self, start: int, mask_cls: Tensor, mask_logits: Tensor) -> Tensor:
        """Adds a window starting at frame ``start``: (Q, K+1) class logits and (Q, W, Hm, Wm)
        mask logits. Returns the (Q,) permutation applied: track i continues with query
        ``perm[i]`` of this window."""
        probs = mask_cls.float().softmax(-1)
        mask_logits = mask_logits.float()
        q, w = mask_logits.shape[:2]
        if self._masks is None:
            if start != 0:
                raise ValueError("WindowTracks.add: the first window must start at frame 0")
            shape = (q, self.num_frames) + tuple(mask_logits.shape[2:])
            self._masks = mask_logits.new_zeros(shape, dtype=STORAGE_DTYPE)
            self._probs = torch.zeros_like(probs)
            perm = torch.arange(q, device=mask_logits.device)
        else:
            if not start <= self._filled:
                raise ValueError(f"WindowTracks.add: window at {start} leaves a gap after frame {self._filled}")
            shared = self._filled - start
            if shared > 0:
                prev = self._masks[:, start : self._filled].float().sigmoid().flatten(1)
                cur = mask_logits[:, :shared].sigmoid().flatten(1)
            else:
                prev = self._masks[:, self._filled - 1].float().sigmoid().flatten(1)
                cur = mask_logits[:, 0].sigmoid().flatten(1)
            rows, cols = linear_sum_assignment(-_soft_dice(prev, cur).cpu().numpy())
            perm = torch.as_tensor(cols[rows.argsort()], dtype=torch.long, device=mask_logits.device)
            mask_logits, probs = mask_logits[perm], probs[perm]
            if shared > 0:
                mean = (self._masks[:, start : self._filled].float() + mask_logits[:, :shared]) * 0.5
                self._masks[:, start : self._filled] = mean
        stop = start + w
        new = self._filled - start
        self._masks[:, self._filled : stop] = mask_logits[:, new:]
        self._filled = max(self._filled, stop)
        self._probs += probs
        self._windows += 1
        return perm

    def class_logits(self) -> Tensor:
        """(Q, K+1) log of the mean class probabilities (a softmax gives the mean back)."""
        if self._probs is None:
            raise RuntimeError("WindowTracks: no window added")
        return (self._probs / self._windows).clamp_min(1e-12).log()

    def frame_logits(self, queries: Tensor, t: int) -> Tensor:
        """(P, Hm, Wm) mask logits of tracks ``queries`` in frame t."""
        if self._masks is None or t >= self._filled:
            raise RuntimeError(f"WindowTracks: frame {t} has not been decoded")
        return self._masks[queries, t].float()
