"""Tests for the YAML files under ``configs/``.

* Every file merges into ``get_cfg()`` + ``add_deeplab_config`` + ``add_maskformer2_config``
  (``merge_from_file`` raises on unknown keys) and no YAML mapping repeats a key.
* Every published Mask2Former config path exists, and merging it gives exactly the values of the
  published file. The published files are rebuilt in their original form (one flat model block
  per leaf, ``!!python/object/apply:eval`` size lists) in a temporary directory and merged side by
  side with ours; the two configs must be equal key for key. The MaskFormer configs are checked
  the same way against the published MaskFormer files, which predate the two keys that select
  the MaskFormer decoder and loss.
* A few representative models build on CPU without weights, and so does every distinct
  architecture with ``M2F_SLOW=1`` (Swin-L included, ~3 minutes); where the papers report a
  parameter count it is checked. The quick-start model also runs inference.
"""
import copy
import functools
import importlib.util
import logging
import os
import tempfile
import time
import unittest
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.projects.deeplab import add_deeplab_config

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CONFIG_ROOT = REPO / "configs"
# The image configs; the video ones (configs/youtubevis_*) are tested in
# tests/modeling/video/test_video_configs.py.
ALL_CONFIGS = sorted(
    p for p in CONFIG_ROOT.rglob("*.yaml") if not p.relative_to(CONFIG_ROOT).parts[0].startswith("youtubevis")
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


def diff_cfgs(a: Any, b: Any, prefix: str = "") -> List[str]:
    """Lists the keys whose values differ between two (nested) configs."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            name = f"{prefix}.{key}" if prefix else key
            if key not in a or key not in b:
                out.append(f"{name}: only in {'first' if key in a else 'second'}")
            else:
                out += diff_cfgs(a[key], b[key], name)
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        # yacs keeps whichever sequence type the file used; only the values matter here.
        return [] if list(a) == list(b) else [f"{prefix}: {a!r} != {b!r}"]
    return [] if a == b and type(a) is type(b) else [f"{prefix}: {a!r} != {b!r}"]


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


# --------------------------------------------------------------------------------------------
# The published files, rebuilt in their original flat form. Values are the published ones.
# --------------------------------------------------------------------------------------------
R50_URL = "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
MEAN_STD = """\
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
"""
CLIP = """\
  CLIP_GRADIENTS:
    ENABLED: True
    CLIP_TYPE: "full_model"
    CLIP_VALUE: 0.01
    NORM_TYPE: 2.0
"""


def resnet_block(depth: int, sync_bn: bool = False, indent: str = "  ") -> str:
    norm = '"SyncBN"' if sync_bn else None
    lines = [
        "RESNETS:",
        f"  DEPTH: {depth}",
        '  STEM_TYPE: "basic"',
        "  STEM_OUT_CHANNELS: 64",
        "  STRIDE_IN_1X1: False",
        '  OUT_FEATURES: ["res2", "res3", "res4", "res5"]',
    ]
    lines += [f"  NORM: {norm}"] if norm else []
    lines += ["  RES5_MULTI_GRID: [1, 1, 1]"]
    return "".join(f"{indent}{line}\n" for line in lines)


def published_base_head(sync_bn: bool = False) -> str:
    return (
        'MODEL:\n  BACKBONE:\n    FREEZE_AT: 0\n    NAME: "build_resnet_backbone"\n'
        f'  WEIGHTS: "{R50_URL}"\n' + MEAN_STD + resnet_block(50, sync_bn)
    )


def crop_input(
    size: int, max_train: int, test: int, max_test: int, crop: str, divisibility: int
) -> str:
    """The published INPUT block of the crop-based (non-COCO) recipes."""
    return f"""\
INPUT:
  MIN_SIZE_TRAIN: !!python/object/apply:eval ["[int(x * 0.1 * {size}) for x in range(5, 21)]"]
  MIN_SIZE_TRAIN_SAMPLING: "choice"
  MIN_SIZE_TEST: {test}
  MAX_SIZE_TRAIN: {max_train}
  MAX_SIZE_TEST: {max_test}
  CROP:
    ENABLED: True
    TYPE: "absolute"
    SIZE: {crop}
    SINGLE_CATEGORY_MAX_AREA: 1.0
  COLOR_AUG_SSD: True
  SIZE_DIVISIBILITY: {divisibility}
  FORMAT: "RGB"
"""


def aug_block(sizes: str, max_size: int) -> str:
    return (
        "TEST:\n  EVAL_PERIOD: 5000\n  AUG:\n    ENABLED: False\n"
        f"    MIN_SIZES: {sizes}\n    MAX_SIZE: {max_size}\n    FLIP: True\n"
    )


ADE_512 = crop_input(512, 2048, 512, 2048, "(512, 512)", 512)
ADE_640 = crop_input(640, 2560, 640, 2560, "(640, 640)", 640)
ADE_512_AUG = aug_block("[256, 384, 512, 640, 768, 896]", 3584)
ADE_640_AUG = aug_block("[320, 480, 640, 800, 960, 1120]", 4480)
CITYSCAPES_INPUT = crop_input(1024, 4096, 1024, 2048, "(512, 1024)", -1)
CITYSCAPES_AUG = aug_block("[512, 768, 1024, 1280, 1536, 1792]", 4096)


def m2f_base(
    train: str,
    test: str,
    mapper: str,
    schedule: str,
    input_block: str,
    test_block: str,
    sync_bn: bool = False,
    workers: int = 4,
) -> str:
    """A published Mask2Former ``Base-<Dataset>-<Task>Segmentation.yaml``."""
    return (
        published_base_head(sync_bn)
        + f'DATASETS:\n  TRAIN: ("{train}",)\n  TEST: ("{test}",)\n'
        + "SOLVER:\n  IMS_PER_BATCH: 16\n  BASE_LR: 0.0001\n"
        + schedule
        + '  WEIGHT_DECAY: 0.05\n  OPTIMIZER: "ADAMW"\n'
        + ('  LR_SCHEDULER_NAME: "WarmupPolyLR"\n' if "STEPS" not in schedule else "")
        + "  BACKBONE_MULTIPLIER: 0.1\n"
        + CLIP
        + "  AMP:\n    ENABLED: True\n"
        + input_block
        + f'  DATASET_MAPPER_NAME: "{mapper}"\n'
        + test_block
        + f"DATALOADER:\n  FILTER_EMPTY_ANNOTATIONS: True\n  NUM_WORKERS: {workers}\nVERSION: 2\n"
    )


def poly(max_iter: int) -> str:
    return f"  MAX_ITER: {max_iter}\n  WARMUP_FACTOR: 1.0\n  WARMUP_ITERS: 0\n"


COCO_SCHEDULE = (
    "  STEPS: (327778, 355092)\n  MAX_ITER: 368750\n  WARMUP_FACTOR: 1.0\n  WARMUP_ITERS: 10\n"
)
COCO_INPUT = '\nINPUT:\n  IMAGE_SIZE: 1024\n  MIN_SCALE: 0.1\n  MAX_SCALE: 2.0\n  FORMAT: "RGB"\n'


def m2f_r50(
    base: str,
    classes: int,
    flags: Tuple[bool, bool, bool],
    ignore: int = 255,
    thr: float = 0.8,
    in_features_twice: bool = False,
) -> str:
    """A published ``maskformer2_R50_*.yaml``: the full Mask2Former model block.

    The published COCO panoptic file lists ``IN_FEATURES`` twice (YAML keeps the last one).
    """
    sem, ins, pan = flags
    first = '    IN_FEATURES: ["res2", "res3", "res4", "res5"]\n' if in_features_twice else ""
    return f"""\
_BASE_: {base}
MODEL:
  META_ARCHITECTURE: "MaskFormer"
  SEM_SEG_HEAD:
    NAME: "MaskFormerHead"
{first}    IGNORE_VALUE: {ignore}
    NUM_CLASSES: {classes}
    LOSS_WEIGHT: 1.0
    CONVS_DIM: 256
    MASK_DIM: 256
    NORM: "GN"
    PIXEL_DECODER_NAME: "MSDeformAttnPixelDecoder"
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
    DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES: ["res3", "res4", "res5"]
    COMMON_STRIDE: 4
    TRANSFORMER_ENC_LAYERS: 6
  MASK_FORMER:
    TRANSFORMER_DECODER_NAME: "MultiScaleMaskedTransformerDecoder"
    TRANSFORMER_IN_FEATURE: "multi_scale_pixel_decoder"
    DEEP_SUPERVISION: True
    NO_OBJECT_WEIGHT: 0.1
    CLASS_WEIGHT: 2.0
    MASK_WEIGHT: 5.0
    DICE_WEIGHT: 5.0
    HIDDEN_DIM: 256
    NUM_OBJECT_QUERIES: 100
    NHEADS: 8
    DROPOUT: 0.0
    DIM_FEEDFORWARD: 2048
    ENC_LAYERS: 0
    PRE_NORM: False
    ENFORCE_INPUT_PROJ: False
    SIZE_DIVISIBILITY: 32
    DEC_LAYERS: 10
    TRAIN_NUM_POINTS: 12544
    OVERSAMPLE_RATIO: 3.0
    IMPORTANCE_SAMPLE_RATIO: 0.75
    TEST:
      SEMANTIC_ON: {sem}
      INSTANCE_ON: {ins}
      PANOPTIC_ON: {pan}
      OVERLAP_THRESHOLD: 0.8
      OBJECT_MASK_THRESHOLD: {thr}
"""


def r101(base: str, sync_bn: bool = False) -> str:
    return f'_BASE_: {base}\nMODEL:\n  WEIGHTS: "R-101.pkl"\n' + resnet_block(101, sync_bn)


# name -> (EMBED_DIM, DEPTHS, NUM_HEADS, WINDOW_SIZE, PRETRAIN_IMG_SIZE, weights file)
SWIN = {
    "tiny": (96, [2, 2, 6, 2], [3, 6, 12, 24], 7, None, "swin_tiny_patch4_window7_224.pkl"),
    "small": (96, [2, 2, 18, 2], [3, 6, 12, 24], 7, None, "swin_small_patch4_window7_224.pkl"),
    "base_384": (128, [2, 2, 18, 2], [4, 8, 16, 32], 12, 384, "swin_base_patch4_window12_384.pkl"),
    "base_IN21k_384": (
        128, [2, 2, 18, 2], [4, 8, 16, 32], 12, 384, "swin_base_patch4_window12_384_22k.pkl",
    ),
    "large_IN21k_384": (
        192, [2, 2, 18, 2], [6, 12, 24, 48], 12, 384, "swin_large_patch4_window12_384_22k.pkl",
    ),
}


def swin(variant: str, base: str, queries: Optional[int] = None, rest: str = "") -> str:
    """A published ``swin/*.yaml`` leaf."""
    embed, depths, heads, window, pretrain, weights = SWIN[variant]
    text = (
        f'_BASE_: {base}\nMODEL:\n  BACKBONE:\n    NAME: "D2SwinTransformer"\n  SWIN:\n'
        f"    EMBED_DIM: {embed}\n    DEPTHS: {depths}\n    NUM_HEADS: {heads}\n"
        f"    WINDOW_SIZE: {window}\n    APE: False\n    DROP_PATH_RATE: 0.3\n"
        "    PATCH_NORM: True\n"
    )
    text += f"    PRETRAIN_IMG_SIZE: {pretrain}\n" if pretrain else ""
    text += f'  WEIGHTS: "{weights}"\n' + MEAN_STD
    text += f"  MASK_FORMER:\n    NUM_OBJECT_QUERIES: {queries}\n" if queries else ""
    return text + rest


def published_mask2former() -> Dict[str, str]:
    """Relative path -> text of the published Mask2Former files (image tasks)."""
    files: Dict[str, str] = {}
    coco_100ep = "SOLVER:\n  STEPS: (655556, 710184)\n  MAX_ITER: 737500\n"
    for task, train, test, mapper, classes, flags in [
        ("panoptic", "coco_2017_train_panoptic", "coco_2017_val_panoptic_with_sem_seg",
         "coco_panoptic_lsj", 133, (True, True, True)),
        ("instance", "coco_2017_train", "coco_2017_val", "coco_instance_lsj", 80,
         (False, True, False)),
    ]:
        d = f"coco/{task}-segmentation"
        base = f"Base-COCO-{task.capitalize()}Segmentation.yaml"
        files[f"{d}/{base}"] = m2f_base(
            train, test, mapper, COCO_SCHEDULE, COCO_INPUT, "TEST:\n  EVAL_PERIOD: 5000\n"
        )
        r50 = "maskformer2_R50_bs16_50ep.yaml"
        files[f"{d}/{r50}"] = m2f_r50(base, classes, flags, in_features_twice=task == "panoptic")
        files[f"{d}/maskformer2_R101_bs16_50ep.yaml"] = r101(r50)
        for v in ["tiny", "small", "base_384", "base_IN21k_384"]:
            files[f"{d}/swin/maskformer2_swin_{v}_bs16_50ep.yaml"] = swin(v, f"../{r50}")
        files[f"{d}/swin/maskformer2_swin_large_IN21k_384_bs16_100ep.yaml"] = swin(
            "large_IN21k_384", f"../{r50}", 200, coco_100ep
        )

    # ADE20K.
    ade = [
        ("semantic", "ade20k_sem_seg", "mask_former_semantic", 150, (True, False, False)),
        ("panoptic", "ade20k_panoptic", "mask_former_panoptic", 150, (True, True, True)),
        ("instance", "ade20k_instance", "mask_former_instance", 100, (True, True, True)),
    ]
    for task, name, mapper, classes, flags in ade:
        d = f"ade20k/{task}-segmentation"
        base = f"Base-ADE20K-{task.capitalize()}Segmentation.yaml"
        size, aug = (ADE_512, ADE_512_AUG) if task == "semantic" else (ADE_640, ADE_640_AUG)
        files[f"{d}/{base}"] = m2f_base(
            f"{name}_train", f"{name}_val", mapper, poly(160000), size, aug
        )
        files[f"{d}/maskformer2_R50_bs16_160k.yaml"] = m2f_r50(base, classes, flags)
        if task != "semantic":
            files[f"{d}/swin/maskformer2_swin_large_IN21k_384_bs16_160k.yaml"] = swin(
                "large_IN21k_384", "../maskformer2_R50_bs16_160k.yaml", 200
            )
    d = "ade20k/semantic-segmentation"
    files[f"{d}/maskformer2_R101_bs16_90k.yaml"] = r101("maskformer2_R50_bs16_160k.yaml", True)
    for v in ["tiny", "small"]:
        files[f"{d}/swin/maskformer2_swin_{v}_bs16_160k.yaml"] = swin(
            v, "../maskformer2_R50_bs16_160k.yaml"
        )
    for v in ["base_384", "base_IN21k_384", "large_IN21k_384"]:
        files[f"{d}/swin/maskformer2_swin_{v}_bs16_160k_res640.yaml"] = swin(
            v, "../maskformer2_R50_bs16_160k.yaml", rest=ADE_640 + ADE_640_AUG
        )

    # Cityscapes.
    city = [
        ("semantic", "sem_seg", "mask_former_semantic", 19, (True, False, False), 100),
        ("panoptic", "panoptic", "mask_former_panoptic", 19, (True, True, True), 200),
        ("instance", "instance_seg", "mask_former_instance", 8, (False, True, False), 200),
    ]
    for task, name, mapper, classes, flags, large_queries in city:
        d = f"cityscapes/{task}-segmentation"
        base = f"Base-Cityscapes-{task.capitalize()}Segmentation.yaml"
        files[f"{d}/{base}"] = m2f_base(
            f"cityscapes_fine_{name}_train", f"cityscapes_fine_{name}_val", mapper, poly(90000),
            CITYSCAPES_INPUT, CITYSCAPES_AUG, sync_bn=True,
        )
        r50 = "maskformer2_R50_bs16_90k.yaml"
        files[f"{d}/{r50}"] = m2f_r50(base, classes, flags)
        files[f"{d}/maskformer2_R101_bs16_90k.yaml"] = r101(r50, True)
        for v in ["tiny", "small", "base_IN21k_384"]:
            files[f"{d}/swin/maskformer2_swin_{v}_bs16_90k.yaml"] = swin(v, f"../{r50}")
        files[f"{d}/swin/maskformer2_swin_large_IN21k_384_bs16_90k.yaml"] = swin(
            "large_IN21k_384", f"../{r50}", large_queries
        )

    # Mapillary Vistas.
    vistas_input = crop_input(2048, 8192, 2048, 2048, "(1024, 1024)", 1024)
    for task, name, mapper, flags, r50, large_queries in [
        ("panoptic", "panoptic", "mask_former_panoptic", (True, False, True),
         "maskformer_R50_bs16_300k.yaml", 200),
        ("semantic", "sem_seg", "mask_former_semantic", (True, False, False),
         "maskformer2_R50_bs16_300k.yaml", 100),
    ]:
        d = f"mapillary-vistas/{task}-segmentation"
        base = f"Base-MapillaryVistas-{task.capitalize()}Segmentation.yaml"
        files[f"{d}/{base}"] = m2f_base(
            f"mapillary_vistas_{name}_train", f"mapillary_vistas_{name}_val", mapper,
            poly(300000), vistas_input, "TEST:\n  EVAL_PERIOD: 0\n", workers=10,
        )
        files[f"{d}/{r50}"] = m2f_r50(base, 65, flags, ignore=65, thr=0.0)
        files[f"{d}/swin/maskformer2_swin_large_IN21k_384_bs16_300k.yaml"] = swin(
            "large_IN21k_384", f"../{r50}", large_queries
        )
    return files


def mf_model(classes: int, ignore: int = 255, extra_head: str = "", extra_mf: str = "") -> str:
    """The published MaskFormer model block (inside ``MODEL:``)."""
    return f"""\
  META_ARCHITECTURE: "MaskFormer"
  SEM_SEG_HEAD:
    NAME: "MaskFormerHead"
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
    IGNORE_VALUE: {ignore}
    NUM_CLASSES: {classes}
    COMMON_STRIDE: 4
    LOSS_WEIGHT: 1.0
    CONVS_DIM: 256
    MASK_DIM: 256
    NORM: "GN"
{extra_head}  MASK_FORMER:
    TRANSFORMER_IN_FEATURE: "{'transformer_encoder' if extra_head else 'res5'}"
    DEEP_SUPERVISION: True
    NO_OBJECT_WEIGHT: 0.1
    DICE_WEIGHT: 1.0
    MASK_WEIGHT: 20.0
    HIDDEN_DIM: 256
    NUM_OBJECT_QUERIES: 100
    NHEADS: 8
    DROPOUT: 0.1
    DIM_FEEDFORWARD: 2048
    ENC_LAYERS: 0
    DEC_LAYERS: 6
    PRE_NORM: False
{extra_mf}"""


def mf_base(train: str, test: str, schedule: str, input_block: str, tail: str) -> str:
    """A published MaskFormer dataset ``Base-*.yaml``."""
    return (
        published_base_head()
        + f'DATASETS:\n  TRAIN: ("{train}",)\n  TEST: ("{test}",)\n'
        + "SOLVER:\n"
        + schedule
        + "  BASE_LR: 0.0001\n  WEIGHT_DECAY: 0.0001\n  OPTIMIZER: \"ADAMW\"\n"
        + "  BACKBONE_MULTIPLIER: 0.1\n  WARMUP_FACTOR: 1.0\n"
        + CLIP
        + input_block
        + tail
        + "VERSION: 2\n"
    )


MF_SWIN_SOLVER = """\
SOLVER:
  BASE_LR: 0.00006
  WARMUP_FACTOR: 1e-6
  WARMUP_ITERS: 1500
  WEIGHT_DECAY: 0.01
  WEIGHT_DECAY_NORM: 0.0
  WEIGHT_DECAY_EMBED: 0.0
  BACKBONE_MULTIPLIER: 1.0
"""
TRANSFORMER_ENCODER = (
    '    PIXEL_DECODER_NAME: "TransformerEncoderPixelDecoder"\n    TRANSFORMER_ENC_LAYERS: 6\n'
)
R101C = """\
  BACKBONE:
    NAME: "build_resnet_deeplab_backbone"
  WEIGHTS: "detectron2://DeepLab/R-103.pkl"
  RESNETS:
    DEPTH: 101
    STEM_TYPE: "deeplab"
    STEM_OUT_CHANNELS: 128
    STRIDE_IN_1X1: False
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
    RES5_MULTI_GRID: [1, 2, 4]
"""


def published_maskformer() -> Dict[str, str]:
    """Relative path (under ``maskformer/``) -> text of the published MaskFormer files."""
    files: Dict[str, str] = {}
    workers4 = "DATALOADER:\n  FILTER_EMPTY_ANNOTATIONS: True\n  NUM_WORKERS: 4\n"
    poly_tail = '  IMS_PER_BATCH: 16\n  WARMUP_ITERS: 0\n  LR_SCHEDULER_NAME: "WarmupPolyLR"\n'

    d = "ade20k-150"
    files[f"{d}/Base-ADE20K-150.yaml"] = mf_base(
        "ade20k_sem_seg_train", "ade20k_sem_seg_val", "  MAX_ITER: 160000\n" + poly_tail,
        ADE_512 + '  DATASET_MAPPER_NAME: "mask_former_semantic"\n', ADE_512_AUG + workers4,
    )
    r50 = "maskformer_R50_bs16_160k.yaml"
    files[f"{d}/{r50}"] = "_BASE_: Base-ADE20K-150.yaml\nMODEL:\n" + mf_model(150)
    files[f"{d}/maskformer_R101_bs16_160k.yaml"] = r101(r50)
    files[f"{d}/maskformer_R101c_bs16_160k.yaml"] = f"_BASE_: {r50}\nMODEL:\n" + R101C
    for v in ["tiny", "small"]:
        files[f"{d}/swin/maskformer_swin_{v}_bs16_160k.yaml"] = swin(
            v, f"../{r50}", rest=MF_SWIN_SOLVER
        )
    for v in ["base_IN21k_384", "large_IN21k_384"]:
        files[f"{d}/swin/maskformer_swin_{v}_bs16_160k_res640.yaml"] = swin(
            v, f"../{r50}", rest=MF_SWIN_SOLVER + ADE_640 + ADE_640_AUG
        )

    d = "ade20k-150-panoptic"
    files[f"{d}/maskformer_panoptic_R50_bs16_720k.yaml"] = (
        "_BASE_: ../ade20k-150/maskformer_R50_bs16_160k.yaml\nMODEL:\n  SEM_SEG_HEAD:\n"
        + TRANSFORMER_ENCODER
        + '  MASK_FORMER:\n    TRANSFORMER_IN_FEATURE: "transformer_encoder"\n    TEST:\n'
        + "      PANOPTIC_ON: True\n      OVERLAP_THRESHOLD: 0.8\n"
        + "      OBJECT_MASK_THRESHOLD: 0.7\n"
        + 'DATASETS:\n  TRAIN: ("ade20k_panoptic_train",)\n  TEST: ("ade20k_panoptic_val",)\n'
        + "SOLVER:\n  MAX_ITER: 720000\n"
        + ADE_640
        + '  DATASET_MAPPER_NAME: "mask_former_panoptic"\nTEST:\n  EVAL_PERIOD: 0\n'
    )
    files[f"{d}/maskformer_panoptic_R101_bs16_720k.yaml"] = r101(
        "maskformer_panoptic_R50_bs16_720k.yaml"
    )

    d = "cityscapes-19"
    files[f"{d}/Base-Cityscapes-19.yaml"] = mf_base(
        "cityscapes_fine_sem_seg_train", "cityscapes_fine_sem_seg_val",
        "  MAX_ITER: 90000\n" + poly_tail,
        CITYSCAPES_INPUT + '  DATASET_MAPPER_NAME: "mask_former_semantic"\n',
        CITYSCAPES_AUG + workers4,
    )
    files[f"{d}/maskformer_R101_bs16_90k.yaml"] = (
        '_BASE_: Base-Cityscapes-19.yaml\nMODEL:\n  WEIGHTS: "R-101.pkl"\n'
        + resnet_block(101)
        + mf_model(19)
    )
    files[f"{d}/maskformer_R101c_bs16_90k.yaml"] = (
        "_BASE_: maskformer_R101_bs16_90k.yaml\nMODEL:\n" + R101C
    )

    d = "coco-panoptic"
    files[f"{d}/Base-COCO-PanopticSegmentation.yaml"] = mf_base(
        "coco_2017_train_panoptic", "coco_2017_val_panoptic",
        "  IMS_PER_BATCH: 64\n  STEPS: (369600,)\n  MAX_ITER: 554400\n  WARMUP_ITERS: 10\n",
        "INPUT:\n  MIN_SIZE_TRAIN: (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)\n"
        '  CROP:\n    ENABLED: True\n    TYPE: "absolute_range"\n    SIZE: (384, 600)\n'
        '  FORMAT: "RGB"\n  DATASET_MAPPER_NAME: "detr_panoptic"\n',
        "TEST:\n  EVAL_PERIOD: 0\n" + workers4,
    )
    panoptic_test = (
        "    TEST:\n      PANOPTIC_ON: True\n      OVERLAP_THRESHOLD: 0.8\n"
        "      OBJECT_MASK_THRESHOLD: 0.8\n"
    )
    r50 = "maskformer_panoptic_R50_bs64_554k.yaml"
    files[f"{d}/{r50}"] = "_BASE_: Base-COCO-PanopticSegmentation.yaml\nMODEL:\n" + mf_model(
        133, extra_head=TRANSFORMER_ENCODER, extra_mf="    SIZE_DIVISIBILITY: 0\n" + panoptic_test
    )
    files[f"{d}/maskformer_panoptic_R101_bs64_554k.yaml"] = r101(r50)
    swin_head = (
        '  SEM_SEG_HEAD:\n    PIXEL_DECODER_NAME: "BasePixelDecoder"\n  MASK_FORMER:\n'
        '    TRANSFORMER_IN_FEATURE: "res5"\n    ENFORCE_INPUT_PROJ: True\n' + panoptic_test
    )
    for v in ["tiny", "small", "base_IN21k_384"]:
        files[f"{d}/swin/maskformer_panoptic_swin_{v}_bs64_554k.yaml"] = swin(
            v, f"../{r50}", rest=swin_head + MF_SWIN_SOLVER
        )
    files[f"{d}/swin/maskformer_panoptic_swin_large_IN21k_384_bs64_554k.yaml"] = swin(
        "large_IN21k_384", f"../{r50}",
        rest=swin_head + MF_SWIN_SOLVER
        + "INPUT:\n  MIN_SIZE_TRAIN: (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)\n"
        '  MAX_SIZE_TRAIN: 1000\n  CROP:\n    ENABLED: True\n    TYPE: "absolute_range"\n'
        '    SIZE: (384, 600)\n  FORMAT: "RGB"\n',
    )

    d = "mapillary-vistas-65"
    files[f"{d}/Base-MapillaryVistas-65.yaml"] = mf_base(
        "mapillary_vistas_sem_seg_train", "mapillary_vistas_sem_seg_val",
        "  MAX_ITER: 300000\n" + poly_tail,
        crop_input(2048, 8192, 2048, 2048, "(1280, 1280)", 1280)
        + '  DATASET_MAPPER_NAME: "mask_former_semantic"\n',
        "TEST:\n  EVAL_PERIOD: 5000\n"
        "DATALOADER:\n  FILTER_EMPTY_ANNOTATIONS: True\n  NUM_WORKERS: 10\n",
    )
    files[f"{d}/maskformer_R50_bs16_300k.yaml"] = (
        "_BASE_: Base-MapillaryVistas-65.yaml\nMODEL:\n" + mf_model(65, ignore=65)
    )
    return files


def _is_leaf(rel: str) -> bool:
    return not Path(rel).name.startswith("Base-")


class _TreeMixin:
    """Writes a published tree to a temporary directory once per test class."""

    files: Dict[str, str] = {}

    @classmethod
    def write_tree(cls, files: Dict[str, str]) -> Path:
        cls._tmp = tempfile.TemporaryDirectory()
        root = Path(cls._tmp.name)
        for rel, text in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        return root

    @classmethod
    def tearDownClass(cls) -> None:
        cls._tmp.cleanup()


# --------------------------------------------------------------------------------------------
class TestConfigFiles(unittest.TestCase):
    def test_found_configs(self) -> None:
        self.assertGreater(len(ALL_CONFIGS), 80)

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


class TestPublishedMask2FormerConfigs(_TreeMixin, unittest.TestCase):
    """Our files are at the published paths and merge to the published values."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.files = published_mask2former()
        cls.root = cls.write_tree(cls.files)

    def test_published_paths_exist(self) -> None:
        missing = [rel for rel in self.files if not (CONFIG_ROOT / rel).is_file()]
        self.assertEqual(missing, [])

    def test_same_values_as_published(self) -> None:
        for rel in sorted(filter(_is_leaf, self.files)):
            with self.subTest(config=rel):
                ours, published = merged(CONFIG_ROOT / rel), merged(self.root / rel)
                self.assertEqual(diff_cfgs(ours, published), [])

    def test_published_coco_panoptic_r50_merges_unchanged(self) -> None:
        # Users' own copies of the published files keep working with this package.
        rel = "coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml"
        cfg = merged(self.root / rel)
        self.assertEqual(cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME, "MSDeformAttnPixelDecoder")
        self.assertEqual(cfg.MODEL.MASK_FORMER.DEC_LAYERS, 10)
        self.assertEqual(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 133)
        self.assertEqual(cfg.SOLVER.STEPS, (327778, 355092))
        self.assertEqual(cfg.INPUT.DATASET_MAPPER_NAME, "coco_panoptic_lsj")
        self.assertEqual(cfg.MODEL.MASK_FORMER.MASK_LOSS_TYPE, "point")

    def test_eval_tag_lists_match_ours(self) -> None:
        # The published files compute MIN_SIZE_TRAIN with an eval tag; ours spell the list out.
        rel = "ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml"
        expected = [int(x * 0.1 * 512) for x in range(5, 21)]
        self.assertEqual(list(merged(self.root / rel).INPUT.MIN_SIZE_TRAIN), expected)
        self.assertEqual(list(merged(CONFIG_ROOT / rel).INPUT.MIN_SIZE_TRAIN), expected)


class TestPublishedMaskFormerConfigs(_TreeMixin, unittest.TestCase):
    """``configs/maskformer/`` mirrors the published MaskFormer files and values."""

    # Keys the published MaskFormer files never set because MaskFormer had one decoder and one
    # mask loss; with Mask2Former's defaults they must be set to select MaskFormer's.
    MASKFORMER_ONLY = {
        "TRANSFORMER_DECODER_NAME": "StandardTransformerDecoder",
        "MASK_LOSS_TYPE": "full",
    }

    @classmethod
    def setUpClass(cls) -> None:
        cls.files = published_maskformer()
        cls.root = cls.write_tree(cls.files)

    def test_published_paths_exist(self) -> None:
        missing = [rel for rel in self.files if not (CONFIG_ROOT / "maskformer" / rel).is_file()]
        self.assertEqual(missing, [])

    def test_same_values_as_published(self) -> None:
        for rel in sorted(filter(_is_leaf, self.files)):
            with self.subTest(config=rel):
                ours = merged(CONFIG_ROOT / "maskformer" / rel)
                published = merged(self.root / rel)
                published.MODEL.MASK_FORMER.merge_from_other_cfg(CfgNode(self.MASKFORMER_ONLY))
                self.assertEqual(diff_cfgs(ours, published), [])


class TestQuickstartConfig(unittest.TestCase):
    PATH = CONFIG_ROOT / "quickstart" / "maskformer2_R18_tiny_coco_panoptic.yaml"

    def test_values(self) -> None:
        cfg = merged(self.PATH)
        self.assertEqual(cfg.MODEL.DEVICE, "cpu")
        self.assertEqual(cfg.MODEL.WEIGHTS, "")
        self.assertEqual(cfg.MODEL.RESNETS.DEPTH, 18)
        self.assertEqual(cfg.MODEL.RESNETS.RES2_OUT_CHANNELS, 64)
        self.assertEqual(cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME, "MSDeformAttnPixelDecoder")
        self.assertEqual(cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES, 20)
        self.assertFalse(cfg.SOLVER.AMP.ENABLED)
        self.assertEqual(cfg.DATALOADER.NUM_WORKERS, 0)
        self.assertTrue(all(s <= cfg.SOLVER.MAX_ITER for s in cfg.SOLVER.STEPS))
        test = cfg.MODEL.MASK_FORMER.TEST
        self.assertTrue(test.SEMANTIC_ON and test.INSTANCE_ON and test.PANOPTIC_ON)


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
        if rel in PAPER_PARAMS_M:
            # The papers round to millions; the class count moves the total by < 0.1M.
            self.assertAlmostEqual(n_params / 1e6, PAPER_PARAMS_M[rel], delta=0.6, msg=rel)

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

        cfg = merged(TestQuickstartConfig.PATH)
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
