"""VideoTrainer / train_net_video.py on the toy YouTube-VIS dataset, with a stand-in model
registered here (the real VideoMaskFormer is tested with the model): the train loader yields
clips in the contract's format, training steps run, and evaluation writes results.json and
reports AP through YTVISEvaluator."""
import argparse
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from mask2former_d2.config import get_maskformer_cfg
from mask2former_d2.data.toy_video import TOY_YTVIS_CATEGORIES, register_toy_ytvis
from mask2former_d2.engine import VideoTrainer
from tests.common import ROOT

PREFIX = "test_engine_toy_ytvis"


@META_ARCH_REGISTRY.register()
class _VideoStandInForTest(nn.Module):
    """Checks the training clips; at inference segments the toy shapes by their category colour."""

    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.num_frames = cfg.INPUT.SAMPLING_FRAME_NUM
        self.colors = torch.tensor([c["color"] for c in TOY_YTVIS_CATEGORIES], dtype=torch.float32)

    @property
    def device(self):
        return self.weight.device

    def forward(self, batched_inputs):
        if self.training:
            for video in batched_inputs:
                assert len(video["image"]) == len(video["instances"]) == self.num_frames
                n = {len(inst) for inst in video["instances"]}
                assert len(n) == 1  # every frame holds all the clip's tracks
                for image, inst in zip(video["image"], video["instances"]):
                    assert image.shape[0] == 3 and tuple(inst.gt_masks.shape[-2:]) == tuple(image.shape[-2:])
                    assert inst.gt_ids.dtype == torch.int64 and inst.gt_classes.dtype == torch.int64
            return {"loss_stand_in": (self.weight - 1.0).pow(2).sum()}
        (video,) = batched_inputs
        frames = torch.stack([im.float() for im in video["image"]])  # (T, 3, H, W) RGB
        frames = F.interpolate(frames, size=(video["height"], video["width"]), mode="bilinear")
        dist = (frames[:, None] - self.colors[None, :, :, None, None]).abs().mean(2)  # (T, K, h, w)
        masks = dist < 35
        scores = masks.flatten(2).float().mean(-1).mean(0)
        order = torch.argsort(scores, descending=True).tolist()
        return {"image_size": (video["height"], video["width"]), "pred_scores": [float(scores[k]) for k in order],
                "pred_labels": order, "pred_masks": [masks[:, k] for k in order]}


def _opts(tmp_path, *extra):
    return [
        "MODEL.META_ARCHITECTURE", "_VideoStandInForTest", "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
        "DATASETS.TRAIN", (f"{PREFIX}_train",), "DATASETS.TEST", (f"{PREFIX}_val",),
        "INPUT.FORMAT", "RGB", "INPUT.MIN_SIZE_TRAIN", (64, 80), "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice_by_clip",
        "INPUT.RANDOM_FLIP", "flip_by_clip", "INPUT.MIN_SIZE_TEST", 64, "INPUT.SAMPLING_FRAME_NUM", 3,
        "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 3, "SOLVER.BASE_LR", 0.1, "SOLVER.CHECKPOINT_PERIOD", 1000,
        "DATALOADER.NUM_WORKERS", 0, "DATALOADER.FILTER_EMPTY_ANNOTATIONS", True,
        "TEST.EVAL_PERIOD", 0, "OUTPUT_DIR", str(tmp_path / "out"), *extra,
    ]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_ytvis")
    register_toy_ytvis(str(root), prefix=PREFIX)
    return root


def test_train_loader_yields_clips(toy_root, tmp_path):
    cfg = get_maskformer_cfg("", _opts(tmp_path))
    batch = next(iter(VideoTrainer.build_train_loader(cfg)))
    assert len(batch) == 2
    for clip in batch:
        assert len(clip["image"]) == len(clip["instances"]) == len(clip["frame_idx"]) == 3
        assert min(clip["image"][0].shape[-2:]) in (64, 80)
    (video,) = next(iter(VideoTrainer.build_test_loader(cfg, f"{PREFIX}_val")))
    assert len(video["image"]) == video["length"] == 8 and "instances" not in video


def test_train_net_video_trains_and_evaluates(toy_root, tmp_path):
    spec = importlib.util.spec_from_file_location("train_net_video", os.path.join(ROOT, "train_net_video.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = argparse.Namespace(config_file="", opts=_opts(tmp_path), eval_only=False, resume=False, num_gpus=1,
                              num_machines=1, machine_rank=0, dist_url="auto")
    module.main(args)  # 3 iterations, then the final evaluation
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")
    args.eval_only = True
    args.opts = _opts(tmp_path, "MODEL.WEIGHTS", str(tmp_path / "out" / "model_final.pth"))
    results = module.main(args)
    ap = results["segm"]["AP"]  # one test dataset: Detectron2 returns its results directly
    assert 30 < ap <= 100  # colour segmentation finds most toy shapes
    written = json.loads((tmp_path / "out" / "inference" / "results.json").read_text())
    assert {r["category_id"] for r in written} == {1, 2, 3}  # dataset ids
    assert np.isfinite([r["score"] for r in written]).all()
