"""The published YouTube-VIS configs (configs/youtubevis_{2019,2021}): paths, values, builds.

The expected values are those of the published files (Mask2Former-VIS), written out here key by
key: the R50 file of each year in full, the others as their differences from it.
"""
import os
import unittest
from pathlib import Path

import torch
from detectron2.modeling import build_model

from mask2former_d2 import get_maskformer_cfg
from tests.test_config_files import _flatten, _UniqueKeyLoader, load_yaml, raw_chain

ROOT = Path(__file__).resolve().parents[3] / "configs"
RUN_SLOW = bool(os.environ.get("M2F_SLOW"))

R50 = {
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "MODEL.BACKBONE.NAME": "build_resnet_backbone",
    "MODEL.WEIGHTS": "model_final_3c8ec9.pkl",
    "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
    "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
    "MODEL.MASK_ON": True,
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.STEM_TYPE": "basic",
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64,
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.RESNETS.RES5_MULTI_GRID": [1, 1, 1],
    "MODEL.META_ARCHITECTURE": "VideoMaskFormer",
    "MODEL.SEM_SEG_HEAD.NAME": "MaskFormerHead",
    "MODEL.SEM_SEG_HEAD.IGNORE_VALUE": 255,
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 40,
    "MODEL.SEM_SEG_HEAD.LOSS_WEIGHT": 1.0,
    "MODEL.SEM_SEG_HEAD.CONVS_DIM": 256,
    "MODEL.SEM_SEG_HEAD.MASK_DIM": 256,
    "MODEL.SEM_SEG_HEAD.NORM": "GN",
    "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME": "MSDeformAttnPixelDecoder",
    "MODEL.SEM_SEG_HEAD.IN_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": ["res3", "res4", "res5"],
    "MODEL.SEM_SEG_HEAD.COMMON_STRIDE": 4,
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 6,
    "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME": "VideoMultiScaleMaskedTransformerDecoder",
    "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE": "multi_scale_pixel_decoder",
    "MODEL.MASK_FORMER.DEEP_SUPERVISION": True,
    "MODEL.MASK_FORMER.NO_OBJECT_WEIGHT": 0.1,
    "MODEL.MASK_FORMER.CLASS_WEIGHT": 2.0,
    "MODEL.MASK_FORMER.MASK_WEIGHT": 5.0,
    "MODEL.MASK_FORMER.DICE_WEIGHT": 5.0,
    "MODEL.MASK_FORMER.HIDDEN_DIM": 256,
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 100,
    "MODEL.MASK_FORMER.NHEADS": 8,
    "MODEL.MASK_FORMER.DROPOUT": 0.0,
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD": 2048,
    "MODEL.MASK_FORMER.ENC_LAYERS": 0,
    "MODEL.MASK_FORMER.PRE_NORM": False,
    "MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ": False,
    "MODEL.MASK_FORMER.SIZE_DIVISIBILITY": 32,
    "MODEL.MASK_FORMER.DEC_LAYERS": 10,
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS": 12544,
    "MODEL.MASK_FORMER.OVERSAMPLE_RATIO": 3.0,
    "MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO": 0.75,
    "MODEL.MASK_FORMER.TEST.SEMANTIC_ON": False,
    "MODEL.MASK_FORMER.TEST.INSTANCE_ON": True,
    "MODEL.MASK_FORMER.TEST.PANOPTIC_ON": False,
    "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD": 0.8,
    "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD": 0.8,
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.BASE_LR": 0.0001,
    "SOLVER.WARMUP_FACTOR": 1.0,
    "SOLVER.WARMUP_ITERS": 10,
    "SOLVER.WEIGHT_DECAY": 0.05,
    "SOLVER.OPTIMIZER": "ADAMW",
    "SOLVER.BACKBONE_MULTIPLIER": 0.1,
    "SOLVER.CLIP_GRADIENTS.ENABLED": True,
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 0.01,
    "SOLVER.CLIP_GRADIENTS.NORM_TYPE": 2.0,
    "SOLVER.AMP.ENABLED": True,
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice_by_clip",
    "INPUT.RANDOM_FLIP": "flip_by_clip",
    "INPUT.AUGMENTATIONS": [],
    "INPUT.MIN_SIZE_TRAIN": [360, 480],
    "INPUT.MIN_SIZE_TEST": 360,
    "INPUT.CROP.ENABLED": False,
    "INPUT.CROP.TYPE": "absolute_range",
    "INPUT.CROP.SIZE": [600, 720],
    "INPUT.FORMAT": "RGB",
    "TEST.EVAL_PERIOD": 0,
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS": False,
    "DATALOADER.NUM_WORKERS": 4,
    "VERSION": 2,
}
YEAR = {
    "2019": {"DATASETS.TRAIN": ["ytvis_2019_train"], "DATASETS.TEST": ["ytvis_2019_val"],
             "SOLVER.STEPS": [4000], "SOLVER.MAX_ITER": 6000},
    "2021": {"DATASETS.TRAIN": ["ytvis_2021_train"], "DATASETS.TEST": ["ytvis_2021_val"],
             "SOLVER.STEPS": [5500], "SOLVER.MAX_ITER": 8000},
}
SWIN = {"MODEL.BACKBONE.NAME": "D2SwinTransformer", "MODEL.SWIN.APE": False, "MODEL.SWIN.DROP_PATH_RATE": 0.3,
        "MODEL.SWIN.PATCH_NORM": True}
VARIANTS = {
    "video_maskformer2_R50_bs16_8ep.yaml": {},
    "video_maskformer2_R101_bs16_8ep.yaml": {"MODEL.WEIGHTS": "model_final_eba159.pkl", "MODEL.RESNETS.DEPTH": 101},
    "swin/video_maskformer2_swin_tiny_bs16_8ep.yaml": {
        **SWIN, "MODEL.SWIN.EMBED_DIM": 96, "MODEL.SWIN.DEPTHS": [2, 2, 6, 2], "MODEL.SWIN.NUM_HEADS": [3, 6, 12, 24],
        "MODEL.SWIN.WINDOW_SIZE": 7, "MODEL.SWIN.PRETRAIN_IMG_SIZE": 224, "MODEL.WEIGHTS": "model_final_86143f.pkl",
        "INPUT.MIN_SIZE_TEST": 480},
    "swin/video_maskformer2_swin_small_bs16_8ep.yaml": {
        **SWIN, "MODEL.SWIN.EMBED_DIM": 96, "MODEL.SWIN.DEPTHS": [2, 2, 18, 2],
        "MODEL.SWIN.NUM_HEADS": [3, 6, 12, 24], "MODEL.SWIN.WINDOW_SIZE": 7, "MODEL.SWIN.PRETRAIN_IMG_SIZE": 224,
        "MODEL.WEIGHTS": "model_final_1e7f22.pkl", "INPUT.MIN_SIZE_TEST": 480},
    "swin/video_maskformer2_swin_base_IN21k_384_bs16_8ep.yaml": {
        **SWIN, "MODEL.SWIN.EMBED_DIM": 128, "MODEL.SWIN.DEPTHS": [2, 2, 18, 2],
        "MODEL.SWIN.NUM_HEADS": [4, 8, 16, 32], "MODEL.SWIN.WINDOW_SIZE": 12, "MODEL.SWIN.PRETRAIN_IMG_SIZE": 384,
        "MODEL.WEIGHTS": "model_final_83d103.pkl", "INPUT.MIN_SIZE_TEST": 480},
    "swin/video_maskformer2_swin_large_IN21k_384_bs16_8ep.yaml": {
        **SWIN, "MODEL.SWIN.EMBED_DIM": 192, "MODEL.SWIN.DEPTHS": [2, 2, 18, 2],
        "MODEL.SWIN.NUM_HEADS": [6, 12, 24, 48], "MODEL.SWIN.WINDOW_SIZE": 12, "MODEL.SWIN.PRETRAIN_IMG_SIZE": 384,
        "MODEL.WEIGHTS": "model_final_e5f453.pkl", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 200},
}


def _expected(year: str, rel: str) -> dict:
    out = {**R50, **YEAR[year], **VARIANTS[rel]}
    if year == "2019" and "swin_large" in rel:
        out["INPUT.MIN_SIZE_TEST"] = 480  # the 2021 file leaves it at 360 (GPU memory)
    return out


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


def _all_files():
    for year in YEAR:
        for rel in ["Base-YouTubeVIS-VideoInstanceSegmentation.yaml", *VARIANTS]:
            yield year, rel, ROOT / f"youtubevis_{year}" / rel


class TestVideoConfigs(unittest.TestCase):
    def test_published_files_exist_and_nothing_else(self):
        expected = {str(p) for _, _, p in _all_files()}
        found = {str(p) for p in ROOT.glob("youtubevis_*/**/*.yaml")}
        self.assertEqual(found, expected)

    def test_values_as_published(self):
        for year, rel, path in _all_files():
            if rel.startswith("Base-"):
                continue
            with self.subTest(config=f"{year}/{rel}"):
                cfg = get_maskformer_cfg(str(path))
                wrong = {k: (_get(cfg, k), v) for k, v in _expected(year, rel).items() if _get(cfg, k) != v}
                self.assertEqual(wrong, {})
                # Our video inference keys keep the published behaviour by default.
                self.assertEqual(cfg.MODEL.MASK_FORMER.TEST.WINDOW_SIZE, 0)
                self.assertEqual(cfg.MODEL.MASK_FORMER.TEST.TOPK_PER_VIDEO, 10)

    def test_style(self):
        # As for the image configs: no repeated keys, no restated inherited values.
        import yaml

        for _, rel, path in _all_files():
            with self.subTest(config=str(path)):
                with open(path) as f:
                    yaml.load(f, Loader=_UniqueKeyLoader)
                own = load_yaml(path)
                if "_BASE_" in own:
                    inherited = dict(_flatten(raw_chain(path.parent / own.pop("_BASE_"))))
                    self.assertEqual([k for k, v in _flatten(own) if k in inherited and inherited[k] == v], [])

    def _build(self, path, *opts):
        cfg = get_maskformer_cfg(str(path), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
        torch.manual_seed(0)
        model = build_model(cfg)
        self.assertEqual(type(model).__name__, "VideoMaskFormer")
        self.assertEqual(type(model.sem_seg_head.predictor).__name__, "VideoMultiScaleMaskedTransformerDecoder")
        return model

    def test_r50_builds_and_runs(self):
        model = self._build(ROOT / "youtubevis_2019" / "video_maskformer2_R50_bs16_8ep.yaml").eval()
        # R50 Mask2Former-VIS: 44M parameters (published model zoo).
        self.assertAlmostEqual(sum(p.numel() for p in model.parameters()) / 1e6, 44, delta=1.0)
        with torch.no_grad():
            out = model([{"image": [torch.rand(3, 64, 96) * 255 for _ in range(2)], "height": 32, "width": 48}])
        self.assertEqual(tuple(out["pred_masks"][0].shape), (2, 32, 48))

    def test_every_config_builds(self):
        # Narrow Swin widths keep this fast; M2F_SLOW=1 builds every file at its real size.
        for year, rel, path in _all_files():
            if rel.startswith("Base-"):
                continue
            with self.subTest(config=f"{year}/{rel}"):
                opts = []
                if "swin" in rel and not RUN_SLOW:
                    heads = _expected(year, rel)["MODEL.SWIN.NUM_HEADS"]
                    opts = ["MODEL.SWIN.EMBED_DIM", 8 * heads[0], "MODEL.SWIN.DEPTHS", [2, 2, 2, 2]]
                elif "R101" in rel and not RUN_SLOW:
                    opts = ["MODEL.RESNETS.DEPTH", 50]
                model = self._build(path, *opts)
                self.assertEqual(model.num_queries, _expected(year, rel)["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES"])


if __name__ == "__main__":
    unittest.main()
