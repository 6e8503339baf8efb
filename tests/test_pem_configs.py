"""PEM's configs under ``configs/pem/`` (and the tiny PEM quick-start config).

* Every file merges after ``add_maskformer2_config`` (which must know PEM's ``MODEL.STDC.*``
  keys) and every leaf builds PEM on CPU without weights: PEM's pixel decoder, the prototype
  decoder with the layers, heads and queries the config names, the backbone it names.
* The values that define PEM's published recipes (PEM's own YAML files at 2dfeb3d) are those
  of the merged configs, written out here by hand as the reference.
* A Mask2Former config still builds Mask2Former's decoder: the name PEM's files share with it is
  resolved only together with ``PIXEL_DECODER_NAME: PEM_Pixel_Decoder``.
"""
import unittest
from pathlib import Path

from detectron2.modeling import build_model

from mask2former_d2.config import get_maskformer_cfg
from mask2former_d2.modeling.backbone.stdc import D2STDCnet
from mask2former_d2.modeling.pixel_decoder.pem import PEM_Pixel_Decoder
from mask2former_d2.modeling.transformer_decoder.mask2former import MultiScaleMaskedTransformerDecoder
from mask2former_d2.modeling.transformer_decoder.pem import PEMTransformerDecoder, PrototypeCrossAttention
from tests.common import ROOT

CONFIGS = Path(ROOT) / "configs"
PEM_CONFIGS = sorted((CONFIGS / "pem").rglob("*.yaml")) + [CONFIGS / "quickstart" / "pem_STDC1_tiny_coco_panoptic.yaml"]
LEAVES = [p for p in PEM_CONFIGS if not p.name.startswith("Base-")]

# What PEM's published files set (dataset, classes, schedule, sizes), by file.
_CITYSCAPES = {
    "SOLVER.BASE_LR": 0.0007, "SOLVER.MAX_ITER": 90000, "INPUT.MIN_SIZE_TEST": 1024,
    "INPUT.MAX_SIZE_TEST": 2048, "INPUT.MAX_SIZE_TRAIN": 4096, "INPUT.CROP.SIZE": [512, 1024],
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 19, "MODEL.RESNETS.NORM": "SyncBN", "INPUT.SIZE_DIVISIBILITY": -1,
    "INPUT.MIN_SIZE_TRAIN": [int(x * 0.1 * 1024) for x in range(5, 21)],
    "TEST.AUG.MIN_SIZES": [512, 768, 1024, 1280, 1536, 1792], "TEST.AUG.MAX_SIZE": 4096,
}
_ADE_PAN = {
    "SOLVER.BASE_LR": 0.0004, "SOLVER.BASE_LR_END": 1e-6, "SOLVER.MAX_ITER": 160000,
    "INPUT.MIN_SIZE_TEST": 640, "INPUT.MAX_SIZE_TEST": 2560, "INPUT.MAX_SIZE_TRAIN": 2560,
    "INPUT.CROP.SIZE": [640, 640], "INPUT.SIZE_DIVISIBILITY": 640, "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 150,
    "INPUT.MIN_SIZE_TRAIN": [int(x * 0.1 * 640) for x in range(5, 21)], "MODEL.RESNETS.NORM": "FrozenBN",
    "DATASETS.TRAIN": ["ade20k_panoptic_train"], "DATASETS.TEST": ["ade20k_panoptic_val"],
    "INPUT.DATASET_MAPPER_NAME": "mask_former_panoptic", "MODEL.MASK_FORMER.TEST.PANOPTIC_ON": True,
    "TEST.AUG.MIN_SIZES": [320, 480, 640, 800, 960, 1120], "TEST.AUG.MAX_SIZE": 4480,
}
_ADE_SEM = {
    **_ADE_PAN, "INPUT.MIN_SIZE_TEST": 512, "INPUT.MAX_SIZE_TEST": 2048, "INPUT.MAX_SIZE_TRAIN": 2048,
    "INPUT.CROP.SIZE": [512, 512], "INPUT.SIZE_DIVISIBILITY": 512,
    "INPUT.MIN_SIZE_TRAIN": [int(x * 0.1 * 512) for x in range(5, 21)],
    "DATASETS.TRAIN": ["ade20k_sem_seg_train"], "DATASETS.TEST": ["ade20k_sem_seg_val"],
    "INPUT.DATASET_MAPPER_NAME": "mask_former_semantic", "MODEL.MASK_FORMER.TEST.PANOPTIC_ON": False,
    "TEST.AUG.MIN_SIZES": [256, 384, 512, 640, 768, 896], "TEST.AUG.MAX_SIZE": 3584,
}
_CITY_PAN = {
    **_CITYSCAPES, "DATASETS.TRAIN": ["cityscapes_fine_panoptic_train"],
    "DATASETS.TEST": ["cityscapes_fine_panoptic_val"], "INPUT.DATASET_MAPPER_NAME": "mask_former_panoptic",
    "MODEL.MASK_FORMER.TEST.PANOPTIC_ON": True,
}
_CITY_SEM = {
    **_CITYSCAPES, "DATASETS.TRAIN": ["cityscapes_fine_sem_seg_train"],
    "DATASETS.TEST": ["cityscapes_fine_sem_seg_val"], "INPUT.DATASET_MAPPER_NAME": "mask_former_semantic",
    "MODEL.MASK_FORMER.TEST.PANOPTIC_ON": False,
}
# The model and optimizer every PEM file sets.
_PEM_MODEL = {
    "MODEL.SEM_SEG_HEAD.CONVS_DIM": 128, "MODEL.SEM_SEG_HEAD.MASK_DIM": 256, "MODEL.SEM_SEG_HEAD.NORM": "SyncBN",
    "MODEL.MASK_FORMER.DEC_LAYERS": 7, "MODEL.MASK_FORMER.PRE_NORM": True,
    "MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ": True, "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 100,
    "MODEL.MASK_FORMER.HIDDEN_DIM": 256, "MODEL.MASK_FORMER.DIM_FEEDFORWARD": 2048,
    "MODEL.MASK_FORMER.CLASS_WEIGHT": 2.0, "MODEL.MASK_FORMER.MASK_WEIGHT": 5.0, "MODEL.MASK_FORMER.DICE_WEIGHT": 5.0,
    "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD": 0.8, "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD": 0.8,
    "MODEL.MASK_FORMER.TEST.INSTANCE_ON": False, "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "INPUT.FORMAT": "RGB", "INPUT.COLOR_AUG_SSD": True, "SOLVER.IMS_PER_BATCH": 32,
    "SOLVER.LR_SCHEDULER_NAME": "WarmupCosineLR", "SOLVER.WARMUP_ITERS": 0, "SOLVER.WEIGHT_DECAY": 0.05,
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 0.01, "SOLVER.AMP.ENABLED": True,
}
_STDC1 = {"MODEL.BACKBONE.NAME": "D2STDCnet", "MODEL.STDC.LAYERS": [2, 2, 2],
          "MODEL.WEIGHTS": "./pretrained_models/STDC1.pkl"}
_STDC2 = {"MODEL.BACKBONE.NAME": "D2STDCnet", "MODEL.STDC.LAYERS": [4, 5, 3],
          "MODEL.WEIGHTS": "./pretrained_models/STDC2.pkl"}
_R50 = {"MODEL.BACKBONE.NAME": "build_resnet_backbone", "MODEL.RESNETS.DEPTH": 50,
        "MODEL.WEIGHTS": "detectron2://ImageNetPretrained/torchvision/R-50.pkl"}
PUBLISHED = {
    "ade20k/panoptic-segmentation/pem_R50_bs32_160k.yaml": {**_ADE_PAN, **_R50},
    # PEM's ADE20K STDC files name a missing base; ours use the R50 file, at the 90k of their name.
    "ade20k/panoptic-segmentation/pem_STDC1_bs32_90k.yaml": {**_ADE_PAN, **_STDC1, "SOLVER.MAX_ITER": 90000},
    "ade20k/panoptic-segmentation/pem_STDC2_bs32_90k.yaml": {**_ADE_PAN, **_STDC2, "SOLVER.MAX_ITER": 90000},
    "ade20k/semantic-segmentation/pem_R50_bs32_160k.yaml": {**_ADE_SEM, **_R50},
    "ade20k/semantic-segmentation/pem_STDC1_bs32_90k.yaml": {**_ADE_SEM, **_STDC1, "SOLVER.MAX_ITER": 90000},
    "ade20k/semantic-segmentation/pem_STDC2_bs32_90k.yaml": {**_ADE_SEM, **_STDC2, "SOLVER.MAX_ITER": 90000},
    "cityscapes/panoptic-segmentation/pem_R50_bs32_90k.yaml": {**_CITY_PAN, **_R50},
    "cityscapes/panoptic-segmentation/pem_STDC1_bs32_90k.yaml": {**_CITY_PAN, **_STDC1},
    "cityscapes/panoptic-segmentation/pem_STDC2_bs32_90k.yaml": {**_CITY_PAN, **_STDC2},
    "cityscapes/semantic-segmentation/pem_R50_bs32_90k.yaml": {**_CITY_SEM, **_R50},
    "cityscapes/semantic-segmentation/pem_STDC1_bs32_90k.yaml": {**_CITY_SEM, **_STDC1},
    "cityscapes/semantic-segmentation/pem_STDC2_bs32_90k.yaml": {**_CITY_SEM, **_STDC2},
}


def _get(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return list(cfg) if isinstance(cfg, (list, tuple)) else cfg


class TestPEMConfigs(unittest.TestCase):
    def test_found_all_of_pems_configs_and_ours(self):
        rel = {str(p.relative_to(CONFIGS / "pem")) for p in LEAVES if "pem" in p.parts[-4:-1]}
        self.assertTrue(set(PUBLISHED) <= rel, set(PUBLISHED) - rel)
        for task in ("panoptic", "instance"):
            for backbone in ("R50", "STDC2"):
                self.assertIn(f"coco/{task}-segmentation/pem_{backbone}_bs32_50ep.yaml", rel)

    def test_published_values(self):
        for rel, expected in PUBLISHED.items():
            cfg = get_maskformer_cfg(str(CONFIGS / "pem" / rel))
            with self.subTest(config=rel):
                wrong = {k: (_get(cfg, k), v) for k, v in {**_PEM_MODEL, **expected}.items() if _get(cfg, k) != v}
                self.assertEqual(wrong, {})

    def test_every_leaf_builds_pem(self):
        for path in LEAVES:
            cfg = get_maskformer_cfg(str(path), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
            with self.subTest(config=str(path.relative_to(CONFIGS))):
                model = build_model(cfg)
                mf = cfg.MODEL.MASK_FORMER
                head = model.sem_seg_head
                self.assertIsInstance(head.pixel_decoder, PEM_Pixel_Decoder)
                self.assertIs(type(head.predictor), PEMTransformerDecoder)
                layers = head.predictor.transformer_cross_attention_layers
                self.assertEqual(len(layers), mf.DEC_LAYERS - 1)
                self.assertTrue(all(isinstance(layer, PrototypeCrossAttention) for layer in layers))
                self.assertEqual(head.predictor.class_embed.out_features, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES + 1)
                self.assertEqual(head.predictor.query_feat.num_embeddings, mf.NUM_OBJECT_QUERIES)
                self.assertTrue(all(layer.normalize_before == mf.PRE_NORM
                                    for layer in head.predictor.transformer_ffn_layers))
                if cfg.MODEL.BACKBONE.NAME == "D2STDCnet":
                    self.assertIsInstance(model.backbone, D2STDCnet)
                    self.assertEqual(len(model.backbone.features), 2 + sum(cfg.MODEL.STDC.LAYERS))

    def test_mask2former_config_still_builds_mask2former(self):
        cfg = get_maskformer_cfg(
            str(CONFIGS / "cityscapes" / "panoptic-segmentation" / "maskformer2_R50_bs16_90k.yaml"),
            ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""],
        )
        predictor = build_model(cfg).sem_seg_head.predictor
        self.assertIs(type(predictor), MultiScaleMaskedTransformerDecoder)
        # The same config with PEM's pixel decoder builds PEM's decoder.
        cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "PEM_Pixel_Decoder"
        self.assertIs(type(build_model(cfg).sem_seg_head.predictor), PEMTransformerDecoder)


if __name__ == "__main__":
    unittest.main()
