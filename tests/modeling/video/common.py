"""A tiny Mask2Former-VIS config and synthetic clips for the video model tests."""
from typing import List

import torch
from detectron2.modeling import build_model
from detectron2.structures import Instances

from tests.common import tiny_cfg

VIDEO_OPTS = (
    "MODEL.META_ARCHITECTURE", "VideoMaskFormer",
    "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "VideoMultiScaleMaskedTransformerDecoder",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 40,
    "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", False,
    "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", False,
    "DATASETS.TEST", ("ytvis_2019_val",),
    "INPUT.SAMPLING_FRAME_NUM", 2,
)


def video_cfg(*opts):
    return tiny_cfg(*VIDEO_OPTS, *opts)


def build_video(*opts, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(video_cfg(*opts))


def make_clip(frames: int, h: int, w: int, seed: int = 0, with_targets: bool = False, tracks: int = 2) -> dict:
    """A clip of random frames; with targets, ``tracks`` moving rectangles in the mapper's format
    (the last track is absent from frame 0)."""
    g = torch.Generator().manual_seed(seed)
    clip = {"image": [torch.randint(0, 256, (3, h, w), generator=g).float() for _ in range(frames)],
            "height": h, "width": w}
    if with_targets:
        per_frame: List[Instances] = []
        for t in range(frames):
            inst = Instances((h, w))
            masks = torch.zeros(tracks, h, w, dtype=torch.bool)
            ids = torch.arange(tracks)
            for j in range(tracks):
                if j == tracks - 1 and t == 0 and tracks > 1:
                    ids[j] = -1
                    continue
                y0, x0 = 4 + 6 * j + t, 4 + 10 * j + 2 * t
                masks[j, y0 : y0 + h // 3, x0 : x0 + w // 3] = True
            inst.gt_masks = masks
            inst.gt_ids = ids
            inst.gt_classes = torch.arange(tracks) % 40
            per_frame.append(inst)
        clip["instances"] = per_frame
    return clip
