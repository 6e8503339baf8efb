"""Tests for the YAML files under ``configs/``.

* Every file merges into ``get_cfg()`` + ``add_deeplab_config`` + ``add_maskformer2_config``
  (``merge_from_file`` raises on unknown keys) and no YAML mapping repeats a key.
* Merging a file gives exactly the values its ``_BASE_`` chain says, as parsed by PyYAML alone.
* A few representative models build on CPU without weights, and so does every distinct
  architecture with ``M2F_SLOW=1`` (Swin-L included, ~3 minutes); the built modules have the
  sizes the config names, and where the papers report a parameter count it is checked. The
  quick-start model also runs inference.
"""
import ast
import contextlib
import copy
import functools
import importlib.util
import logging
import os
import tempfile
import time
import unittest
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.projects.deeplab import add_deeplab_config

from tests.common import ROOT

logger = logging.getLogger(__name__)

REPO = Path(ROOT)
CONFIG_ROOT = REPO / "configs"
# The image configs; the video ones (configs/youtubevis_* and the video quick-start) are tested in
# tests/modeling/video/test_video_configs.py.
ALL_CONFIGS = sorted(
    p for p in CONFIG_ROOT.rglob("*.yaml")
    if not p.relative_to(CONFIG_ROOT).parts[0].startswith("youtubevis") and not p.name.startswith("video_")
)
RUN_SLOW = bool(os.environ.get("M2F_SLOW"))


def _load_add_maskformer2_config() -> Callable[[CfgNode], None]:
    """Returns ``add_maskformer2_config``.

    The config tests must not depend on the model code, so if the package fails to import
    (another module is broken), ``config.py`` is loaded on its own; the build tests below still
    import the whole package and fail loudly in that case.
    """
    try:
        from mask2former_d2.config import add_maskformer2_config

        return add_maskformer2_config
    except ImportError as exc:
        logger.warning("mask2former_d2 does not import (%s); loading config.py alone", exc)
        spec = importlib.util.spec_from_file_location(
            "_m2f_config_only", REPO / "mask2former_d2" / "config.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.add_maskformer2_config


add_maskformer2_config = _load_add_maskformer2_config()


def new_cfg() -> CfgNode:
    """Detectron2 defaults + DeepLab keys + this project's keys."""
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    return cfg


@functools.lru_cache(maxsize=None)
def _merged(path: str) -> CfgNode:
    cfg = new_cfg()
    cfg.merge_from_file(path)
    return cfg


def merged(path: Path) -> CfgNode:
    """The config of a YAML file; each file is parsed once (PyYAML is slow) and copied out."""
    return _merged(str(path)).clone()


@functools.lru_cache(maxsize=None)
def _load_yaml(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def load_yaml(path: Path) -> Dict[str, Any]:
    return copy.deepcopy(_load_yaml(str(path)))


def raw_chain(path: Path) -> Dict[str, Any]:
    """What the YAML files of a ``_BASE_`` chain set, merged (no code defaults)."""
    data = load_yaml(path)
    base = data.pop("_BASE_", None)
    result = raw_chain(path.parent / base) if base else {}

    def update(dst: Dict[str, Any], src: Dict[str, Any]) -> None:
        for key, value in src.items():
            if isinstance(value, dict) and isinstance(dst.get(key), dict):
                update(dst[key], value)
            else:
                dst[key] = copy.deepcopy(value)

    update(result, data)
    return result


def _flatten(node: Any, prefix: str = "") -> List[Tuple[str, Any]]:
    if isinstance(node, dict):
        out: List[Tuple[str, Any]] = []
        for key, value in node.items():
            out += _flatten(value, f"{prefix}.{key}" if prefix else key)
        return out
    return [(prefix, node)]


def mismatches(cfg: CfgNode, path: Path) -> List[str]:
    """The keys set by the ``_BASE_`` chain of ``path`` (parsed by PyYAML alone) whose value
    in ``cfg`` differs from what the files say."""
    wrong = []
    for key, value in _flatten(raw_chain(path)):
        if isinstance(value, str):
            # Detectron2's YAML files write tuples as Python literals in strings, "(1, 2)".
            with contextlib.suppress(ValueError, SyntaxError):
                value = ast.literal_eval(value)
        got: Any = cfg
        for part in key.split("."):
            got = got[part]
        if isinstance(got, (list, tuple)) and isinstance(value, (list, tuple)):
            got, value = list(got), list(value)  # yacs keeps the file's sequence type
        if got != value:
            wrong.append(f"{key}: file says {value!r}, merged {got!r}")
    return wrong


# The configs of the published Mask2Former model zoo (its tables list these names).
PUBLISHED_MODEL_ZOO = [
    f"{prefix}/{name}.yaml"
    for prefix, names in {
        "coco/panoptic-segmentation": ["maskformer2_R50_bs16_50ep", "maskformer2_R101_bs16_50ep"],
        "coco/panoptic-segmentation/swin": [
            "maskformer2_swin_tiny_bs16_50ep", "maskformer2_swin_small_bs16_50ep",
            "maskformer2_swin_base_384_bs16_50ep", "maskformer2_swin_base_IN21k_384_bs16_50ep",
            "maskformer2_swin_large_IN21k_384_bs16_100ep"],
        "coco/instance-segmentation": ["maskformer2_R50_bs16_50ep", "maskformer2_R101_bs16_50ep"],
        "coco/instance-segmentation/swin": [
            "maskformer2_swin_tiny_bs16_50ep", "maskformer2_swin_small_bs16_50ep",
            "maskformer2_swin_base_384_bs16_50ep", "maskformer2_swin_base_IN21k_384_bs16_50ep",
            "maskformer2_swin_large_IN21k_384_bs16_100ep"],
        "ade20k/semantic-segmentation": ["maskformer2_R50_bs16_160k", "maskformer2_R101_bs16_90k"],
        "ade20k/semantic-segmentation/swin": [
            "maskformer2_swin_tiny_bs16_160k", "maskformer2_swin_small_bs16_160k",
            "maskformer2_swin_base_384_bs16_160k_res640",
            "maskformer2_swin_base_IN21k_384_bs16_160k_res640",
            "maskformer2_swin_large_IN21k_384_bs16_160k_res640"],
        "ade20k/panoptic-segmentation": ["maskformer2_R50_bs16_160k"],
        "ade20k/panoptic-segmentation/swin": ["maskformer2_swin_large_IN21k_384_bs16_160k"],
        "ade20k/instance-segmentation": ["maskformer2_R50_bs16_160k"],
        "ade20k/instance-segmentation/swin": ["maskformer2_swin_large_IN21k_384_bs16_160k"],
        **{
            f"cityscapes/{task}-segmentation": ["maskformer2_R50_bs16_90k", "maskformer2_R101_bs16_90k"]
            for task in ("semantic", "panoptic", "instance")
        },
        **{
            f"cityscapes/{task}-segmentation/swin": [
                "maskformer2_swin_tiny_bs16_90k", "maskformer2_swin_small_bs16_90k",
                "maskformer2_swin_base_IN21k_384_bs16_90k", "maskformer2_swin_large_IN21k_384_bs16_90k"]
            for task in ("semantic", "panoptic", "instance")
        },
        "mapillary-vistas/panoptic-segmentation": ["maskformer_R50_bs16_300k"],
        "mapillary-vistas/panoptic-segmentation/swin": ["maskformer2_swin_large_IN21k_384_bs16_300k"],
        "mapillary-vistas/semantic-segmentation": ["maskformer2_R50_bs16_300k"],
        "mapillary-vistas/semantic-segmentation/swin": ["maskformer2_swin_large_IN21k_384_bs16_300k"],
    }.items()
    for name in names
]
# Classes of each dataset's task (COCO: 133 panoptic categories, 80 things; ADE20K: 150 / 100
# instance classes; Cityscapes: 19 / 8 instance classes; Mapillary Vistas v1.2: 65).
PUBLISHED_NUM_CLASSES = {
    ("coco", "panoptic-segmentation"): 133, ("coco", "instance-segmentation"): 80,
    ("ade20k", "semantic-segmentation"): 150, ("ade20k", "panoptic-segmentation"): 150,
    ("ade20k", "instance-segmentation"): 100,
    ("cityscapes", "semantic-segmentation"): 19, ("cityscapes", "panoptic-segmentation"): 19,
    ("cityscapes", "instance-segmentation"): 8,
    ("mapillary-vistas", "semantic-segmentation"): 65, ("mapillary-vistas", "panoptic-segmentation"): 65,
}
# (SEMANTIC_ON, INSTANCE_ON, PANOPTIC_ON) of the published YAMLs: a panoptic model reports PQ, AP
# and mIoU, except on Mapillary Vistas (PQ and mIoU); ADE20K's instance configs switch all three on.
PUBLISHED_OUTPUTS = {
    "semantic-segmentation": (True, False, False),
    "instance-segmentation": (False, True, False),
    "panoptic-segmentation": (True, True, True),
    ("ade20k", "instance-segmentation"): (True, True, True),
    ("mapillary-vistas", "panoptic-segmentation"): (True, False, True),
}
SWIN_EMBED_DIM = {"tiny": 96, "small": 96, "base": 128, "large": 192}


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a mapping with a repeated key (PyYAML keeps the last one)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Dict:
    keys = [loader.construct_object(k) for k, _ in node.value]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"repeated key(s) {repeated} {node.start_mark}")
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _is_leaf(rel: str) -> bool:
    return not Path(rel).name.startswith("Base-")


# --------------------------------------------------------------------------------------------
class TestConfigFiles(unittest.TestCase):
    def test_published_model_zoo(self) -> None:
        # Every config of the published model zoo is here (so the merge and value tests below
        # cover it) and says what its name and the published tables say: dataset classes, task
        # outputs, backbone.
        found = {str(p.relative_to(CONFIG_ROOT)) for p in ALL_CONFIGS}
        for rel in PUBLISHED_MODEL_ZOO:
            with self.subTest(config=rel):
                self.assertIn(rel, found)
                cfg = merged(CONFIG_ROOT / rel)
                dataset, task = rel.split("/")[:2]
                self.assertEqual(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, PUBLISHED_NUM_CLASSES[dataset, task])
                test = cfg.MODEL.MASK_FORMER.TEST
                self.assertEqual(
                    (test.SEMANTIC_ON, test.INSTANCE_ON, test.PANOPTIC_ON),
                    PUBLISHED_OUTPUTS.get((dataset, task), PUBLISHED_OUTPUTS[task]),
                )
                name = Path(rel).name
                if "swin" in name:
                    self.assertEqual(cfg.MODEL.BACKBONE.NAME, "D2SwinTransformer")
                    size = name.split("_")[2]
                    self.assertEqual(cfg.MODEL.SWIN.EMBED_DIM, SWIN_EMBED_DIM[size])
                    self.assertEqual(cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE, 384 if "384" in name else 224)
                else:
                    self.assertEqual(cfg.MODEL.RESNETS.DEPTH, 101 if "R101" in name else 50)

    def test_every_config_merges(self) -> None:
        for path in ALL_CONFIGS:
            with self.subTest(config=str(path.relative_to(CONFIG_ROOT))):
                cfg = merged(path)
                self.assertEqual(cfg.MODEL.META_ARCHITECTURE, "MaskFormer")

    def test_unknown_key_is_rejected(self) -> None:
        # The check above is only meaningful if merging raises on a key nobody defined.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "typo.yaml"
            path.write_text("MODEL:\n  MASK_FORMER:\n    NUM_OBJECT_QUERIE: 100\n")
            with self.assertRaises(KeyError):
                merged(path)

    def test_repeated_key_is_detected(self) -> None:
        # PyYAML silently keeps the last of two equal keys; the loader used below must not.
        with self.assertRaises(ValueError):
            yaml.load("MODEL:\n  WEIGHTS: a\n  WEIGHTS: b\n", Loader=_UniqueKeyLoader)

    def test_no_repeated_keys(self) -> None:
        for path in ALL_CONFIGS:
            with self.subTest(config=str(path.relative_to(CONFIG_ROOT))):
                with open(path) as f:
                    yaml.load(f, Loader=_UniqueKeyLoader)  # raises on a repeated key

    def test_no_file_restates_an_inherited_value(self) -> None:
        # A file that sets a key to the value its _BASE_ chain already sets is noise
        # (STYLE.md section 4); values equal to the code defaults may be spelled out.
        for path in ALL_CONFIGS:
            own = load_yaml(path)
            if "_BASE_" not in own:
                continue
            inherited = dict(_flatten(raw_chain(path.parent / own.pop("_BASE_"))))
            restated = [k for k, v in _flatten(own) if k in inherited and inherited[k] == v]
            with self.subTest(config=str(path.relative_to(CONFIG_ROOT))):
                self.assertEqual(restated, [])


class TestYamlValues(unittest.TestCase):
    """Merging gives exactly what the YAML files say.

    The expected values come from parsing each ``_BASE_`` chain with PyYAML alone (a later file
    overriding an earlier one, key by key), independently of yacs' merging and of the code
    defaults: every key the files set must have that value in the merged config.
    """

    def test_merged_values_are_the_files_values(self) -> None:
        for path in ALL_CONFIGS:
            with self.subTest(config=str(path.relative_to(CONFIG_ROOT))):
                self.assertEqual(mismatches(merged(path), path), [])

    def test_detects_a_changed_value(self) -> None:
        # The comparison above is only meaningful if a value differing from the files shows.
        path = CONFIG_ROOT / "coco" / "panoptic-segmentation" / "maskformer2_R50_bs16_50ep.yaml"
        cfg = merged(path)
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 134  # set to 133 by Base-COCO-PanopticSegmentation
        self.assertEqual(len(mismatches(cfg, path)), 1)


# --------------------------------------------------------------------------------------------
# Building the models.
# --------------------------------------------------------------------------------------------
# Parameters (millions) reported in the papers: Mask2Former Table 1 (COCO panoptic) and
# MaskFormer Tables 1 and 3 (ADE20K-150 semantic; COCO panoptic).
PAPER_PARAMS_M = {
    "coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml": 44,
    "coco/panoptic-segmentation/maskformer2_R101_bs16_50ep.yaml": 63,
    "coco/panoptic-segmentation/swin/maskformer2_swin_tiny_bs16_50ep.yaml": 47,
    "coco/panoptic-segmentation/swin/maskformer2_swin_small_bs16_50ep.yaml": 69,
    "coco/panoptic-segmentation/swin/maskformer2_swin_base_384_bs16_50ep.yaml": 107,
    "coco/panoptic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml": 216,
    "maskformer/ade20k-150/maskformer_R50_bs16_160k.yaml": 41,
    "maskformer/ade20k-150/maskformer_R101_bs16_160k.yaml": 60,
    "maskformer/ade20k-150/swin/maskformer_swin_tiny_bs16_160k.yaml": 42,
    "maskformer/ade20k-150/swin/maskformer_swin_small_bs16_160k.yaml": 63,
    "maskformer/ade20k-150/swin/maskformer_swin_base_IN21k_384_bs16_160k_res640.yaml": 102,
    "maskformer/ade20k-150/swin/maskformer_swin_large_IN21k_384_bs16_160k_res640.yaml": 212,
    "maskformer/coco-panoptic/maskformer_panoptic_R50_bs64_554k.yaml": 45,
    "maskformer/coco-panoptic/maskformer_panoptic_R101_bs64_554k.yaml": 64,
}


def architecture_key(cfg: CfgNode) -> str:
    """The MODEL sub-tree without the keys that do not change which modules are built."""
    model = cfg.MODEL.clone()
    for key in ("WEIGHTS", "DEVICE", "PIXEL_MEAN", "PIXEL_STD"):
        model.pop(key)
    for key in ("NUM_CLASSES", "IGNORE_VALUE", "LOSS_WEIGHT"):  # NUM_CLASSES: one Linear only
        model.SEM_SEG_HEAD.pop(key)
    for key in ("TEST", "SIZE_DIVISIBILITY", "CLASS_WEIGHT", "MASK_WEIGHT", "DICE_WEIGHT",
                "NO_OBJECT_WEIGHT", "TRAIN_NUM_POINTS", "OVERSAMPLE_RATIO",
                "IMPORTANCE_SAMPLE_RATIO"):
        model.MASK_FORMER.pop(key)
    model.pop("RESNETS" if model.BACKBONE.NAME == "D2SwinTransformer" else "SWIN")
    return model.dump()


# Built by default: one model per decoder and backbone family (a few seconds each on CPU).
REPRESENTATIVES = [
    "coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml",
    "coco/panoptic-segmentation/swin/maskformer2_swin_tiny_bs16_50ep.yaml",
    "maskformer/ade20k-150/maskformer_R50_bs16_160k.yaml",
    "maskformer/ade20k-150/swin/maskformer_swin_tiny_bs16_160k.yaml",
    "maskformer/coco-panoptic/maskformer_panoptic_R50_bs64_554k.yaml",
]


def distinct_architectures() -> List[Tuple[str, CfgNode]]:
    """One config per architecture, preferring the ones with a known parameter count."""
    chosen: Dict[str, Tuple[str, CfgNode]] = {}
    for path in ALL_CONFIGS:
        rel = str(path.relative_to(CONFIG_ROOT))
        if not _is_leaf(rel):
            continue
        cfg = merged(path)
        key = architecture_key(cfg)
        preferred = rel in REPRESENTATIVES or rel in PAPER_PARAMS_M
        if key not in chosen or (preferred and chosen[key][0] not in PAPER_PARAMS_M):
            chosen[key] = (rel, cfg)
    return sorted(chosen.values(), key=lambda item: item[0])


class TestBuildConfigs(unittest.TestCase):
    """The models build on CPU without weights, with the parameter counts of the papers."""

    @classmethod
    def setUpClass(cls) -> None:
        import mask2former_d2  # noqa: F401  (registers the model; must import cleanly)

    def _build(self, rel: str, cfg: CfgNode) -> None:
        from detectron2.modeling import build_model

        cfg = cfg.clone()
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.WEIGHTS = ""
        start = time.perf_counter()
        model = build_model(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        elapsed = time.perf_counter() - start
        logger.info("%s: %.1fM parameters, %.1f s", rel, n_params / 1e6, elapsed)
        self.assertEqual(type(model).__name__, "MaskFormer")
        self.assertTrue(all(p.device.type == "cpu" for p in model.parameters()))
        self.assert_shapes_follow_config(model, cfg)
        if rel in PAPER_PARAMS_M:
            # The papers round to millions; the class count moves the total by < 0.1M.
            self.assertAlmostEqual(n_params / 1e6, PAPER_PARAMS_M[rel], delta=0.6, msg=rel)

    def assert_shapes_follow_config(self, model: torch.nn.Module, cfg: CfgNode) -> None:
        """The sizes the config names are those of the built modules."""
        mf, head = cfg.MODEL.MASK_FORMER, cfg.MODEL.SEM_SEG_HEAD
        predictor = model.sem_seg_head.predictor
        self.assertEqual(
            tuple(predictor.class_embed.weight.shape), (head.NUM_CLASSES + 1, mf.HIDDEN_DIM)
        )
        self.assertEqual(tuple(predictor.query_embed.weight.shape), (mf.NUM_OBJECT_QUERIES, mf.HIDDEN_DIM))
        self.assertEqual(predictor.mask_embed.layers[-1].out_features, head.MASK_DIM)
        if mf.TRANSFORMER_DECODER_NAME == "MultiScaleMaskedTransformerDecoder":
            # The prediction from the learned queries counts as one of DEC_LAYERS.
            self.assertEqual(len(predictor.transformer_ffn_layers), mf.DEC_LAYERS - 1)
            self.assertEqual(
                predictor.transformer_ffn_layers[0].linear1.out_features, mf.DIM_FEEDFORWARD
            )
        else:
            self.assertEqual(len(predictor.transformer.decoder.layers), mf.DEC_LAYERS)
            self.assertEqual(len(predictor.transformer.encoder.layers), mf.ENC_LAYERS)

    def test_build_representatives(self) -> None:
        for rel in REPRESENTATIVES:
            with self.subTest(config=rel):
                self._build(rel, merged(CONFIG_ROOT / rel))

    @unittest.skipUnless(RUN_SLOW, "set M2F_SLOW=1 to build every architecture (~3 min)")
    def test_build_every_architecture(self) -> None:
        architectures = distinct_architectures()
        self.assertGreater(len(architectures), 20)
        for rel, cfg in architectures:
            if rel not in REPRESENTATIVES:
                with self.subTest(config=rel):
                    self._build(rel, cfg)

    def test_quickstart_runs_inference(self) -> None:
        from detectron2.modeling import build_model

        cfg = merged(CONFIG_ROOT / "quickstart" / "maskformer2_R18_tiny_coco_panoptic.yaml")
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        images = [torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8).float() for _ in range(2)]
        inputs = [{"image": im, "height": 48, "width": 64} for im in images]
        with torch.no_grad():
            outputs = model(inputs)
        self.assertEqual(len(outputs), 2)
        for out in outputs:
            self.assertEqual(tuple(out["sem_seg"].shape), (133, 48, 64))
            panoptic, segments = out["panoptic_seg"]
            self.assertEqual(tuple(panoptic.shape), (48, 64))
            self.assertIsInstance(segments, list)
            self.assertEqual(out["instances"].image_size, (48, 64))


if __name__ == "__main__":
    unittest.main()
