"""Configuration keys of MaskFormer / Mask2Former.

``add_maskformer2_config`` defines every key of the published Mask2Former config with the
published default, so published YAML files merge unchanged (after Detectron2's
``add_deeplab_config``). Keys this project adds have defaults that keep published behaviour.
"""
from detectron2.config import CfgNode as CN

__all__ = [
    "add_maskformer2_config", "add_maskformer2_video_config", "get_cpu_tool_cfg", "get_maskformer_cfg", "validate_cfg",
]


def add_maskformer2_config(cfg: CN) -> None:
    """Adds the MaskFormer/Mask2Former keys to ``cfg`` in place."""
    # ---------------------------------------------------------------- data
    # Name of the dataset mapper used for training (see mask2former_d2.data).
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    # Photometric distortion as in SSD.
    cfg.INPUT.COLOR_AUG_SSD = False
    # Random crops are retried until no category covers more than this fraction of the crop.
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # Padding divisibility applied by the semantic mapper (-1: no padding).
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    # Large-scale jitter: output size and scale range.
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0
    # Datasets registered from their files, no code: "NAME:FORMAT:ARG,ARG,..." specs (formats
    # coco_instances, coco_panoptic, sem_seg, ytvis; see mask2former_d2/data/datasets/custom.py
    # and docs/custom_datasets.md). The --dataset flag of the entry points adds to this list.
    cfg.DATASETS.CUSTOM = []
    # False: MODEL.SEM_SEG_HEAD.NUM_CLASSES must equal the class count of the custom datasets in
    # DATASETS.TRAIN/TEST (an error names both); True: it is set from them.
    cfg.DATASETS.SET_NUM_CLASSES = False

    # -------------------------------------------------------------- solver
    # Weight decay applied to embeddings (query features, level embeddings, ...).
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # "ADAMW" or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Learning-rate factor for backbone parameters.
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Exponent of the "WarmupPolyLR" schedule (used by the semantic configs).
    if "POLY_LR_POWER" not in cfg.SOLVER:
        cfg.SOLVER.POLY_LR_POWER = 0.9
    if "POLY_LR_CONSTANT_ENDING" not in cfg.SOLVER:
        cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0

    # --------------------------------------------------------------- model
    mf = cfg.MODEL.MASK_FORMER = CN()
    # Loss: deep supervision on every decoder layer, class weights and loss weights.
    mf.DEEP_SUPERVISION = True
    mf.NO_OBJECT_WEIGHT = 0.1
    mf.CLASS_WEIGHT = 1.0
    mf.DICE_WEIGHT = 1.0
    mf.MASK_WEIGHT = 20.0
    # "point": BCE + dice on importance-sampled points (Mask2Former);
    # "full": sigmoid focal + dice on full-resolution masks (original MaskFormer).
    mf.MASK_LOSS_TYPE = "point"

    # Transformer decoder.
    mf.NHEADS = 8
    mf.DROPOUT = 0.1
    mf.DIM_FEEDFORWARD = 2048
    mf.ENC_LAYERS = 0
    mf.DEC_LAYERS = 6
    mf.PRE_NORM = False
    mf.HIDDEN_DIM = 256
    mf.NUM_OBJECT_QUERIES = 100
    # What the transformer decoder reads: "multi_scale_pixel_decoder", "transformer_encoder",
    # "pixel_embedding" or a backbone feature name such as "res5".
    mf.TRANSFORMER_IN_FEATURE = "res5"
    mf.ENFORCE_INPUT_PROJ = False
    mf.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"

    # Inference.
    mf.TEST = CN()
    mf.TEST.SEMANTIC_ON = True
    mf.TEST.INSTANCE_ON = False
    mf.TEST.PANOPTIC_ON = False
    mf.TEST.OBJECT_MASK_THRESHOLD = 0.0
    mf.TEST.OVERLAP_THRESHOLD = 0.0
    mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
    # Arithmetic of inference: "fp32", or "bf16" / "fp16" where the device has the units for
    # them (see mask2former_d2/accel/precision.py).
    mf.TEST.PRECISION = "fp32"

    # Build the model with the fast formulations of mask2former_d2/accel/ (banded post-processing,
    # embedding_bag deformable-attention sampling, folded frozen BN, channels-last ResNet input,
    # 1x1 convs as matrix products, chunked encoder layers). Same outputs up to float rounding;
    # False builds the plain reference formulations (which torch.export/ONNX export needs).
    mf.FAST_PATHS = True

    # Inputs are padded to a multiple of this (-1: use the backbone's size_divisibility).
    mf.SIZE_DIVISIBILITY = 32

    # Point-sampled mask loss: points per mask and PointRend importance sampling.
    mf.TRAIN_NUM_POINTS = 112 * 112
    mf.OVERSAMPLE_RATIO = 3.0
    mf.IMPORTANCE_SAMPLE_RATIO = 0.75

    # ------------------------------------------------------- pixel decoder
    head = cfg.MODEL.SEM_SEG_HEAD
    head.MASK_DIM = 256
    # Transformer encoder layers inside the pixel decoder.
    head.TRANSFORMER_ENC_LAYERS = 0
    head.PIXEL_DECODER_NAME = "BasePixelDecoder"
    # Multi-scale deformable attention encoder.
    head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8

    # ------------------------------------------------------- STDC backbone (PEM's D2STDCnet)
    stdc = cfg.MODEL.STDC = CN()
    # Blocks per stage: [2, 2, 2] is STDC1, [4, 5, 3] STDC2.
    stdc.LAYERS = [2, 2, 2]
    # ConvX units per block, and how a block merges them: "cat" or "add" (PEM's spelling).
    stdc.BLOCK_NUM = 4
    stdc.BLOCK_TIPE = "cat"
    # A 1x1 ConvX after the last stage.
    stdc.USE_CONV_LAST = False
    # Accepted for PEM's YAML files; as in PEM, the backbone always uses plain BatchNorm.
    stdc.NORM = "SyncBN"
    stdc.OUT_FEATURES = ["res2", "res3", "res4", "res5"]

    # ------------------------------------------------------- Swin backbone
    swin = cfg.MODEL.SWIN = CN()
    swin.PRETRAIN_IMG_SIZE = 224
    swin.PATCH_SIZE = 4
    swin.EMBED_DIM = 96
    swin.DEPTHS = [2, 2, 6, 2]
    swin.NUM_HEADS = [3, 6, 12, 24]
    swin.WINDOW_SIZE = 7
    swin.MLP_RATIO = 4.0
    swin.QKV_BIAS = True
    swin.QK_SCALE = None
    swin.DROP_RATE = 0.0
    swin.ATTN_DROP_RATE = 0.0
    swin.DROP_PATH_RATE = 0.3
    swin.APE = False
    swin.PATCH_NORM = True
    swin.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    swin.USE_CHECKPOINT = False


def add_maskformer2_video_config(cfg: CN) -> None:
    """Adds the keys of the video model (Mask2Former-VIS) to ``cfg`` in place."""
    # Training clips: SAMPLING_FRAME_NUM frames within +-SAMPLING_FRAME_RANGE of a random
    # reference frame, in temporal order unless SAMPLING_FRAME_SHUFFLE.
    cfg.INPUT.SAMPLING_FRAME_NUM = 2
    cfg.INPUT.SAMPLING_FRAME_RANGE = 20
    cfg.INPUT.SAMPLING_FRAME_SHUFFLE = False
    # Extra clip-consistent augmentations: any of "brightness", "contrast", "saturation", "rotation".
    cfg.INPUT.AUGMENTATIONS = []

    # Video inference (keys of this project; the defaults give the published outputs). Needs the
    # MODEL.MASK_FORMER node of add_maskformer2_config, which is added first if missing.
    if "MASK_FORMER" not in cfg.MODEL:
        add_maskformer2_config(cfg)
    test = cfg.MODEL.MASK_FORMER.TEST
    # The backbone and pixel decoder run over this many frames at a time (<= 0: all at once);
    # outputs do not depend on it, only memory does.
    test.FRAME_CHUNK_SIZE = 8
    # Predictions ((query, class) pairs) kept per video.
    test.TOPK_PER_VIDEO = 10
    # > 0: decode clips longer than this in windows of WINDOW_SIZE frames overlapping by
    # WINDOW_OVERLAP frames, tracks associated across windows by mask similarity on the overlap
    # (bounded memory for any length, but different outputs); 0: the whole clip at once.
    test.WINDOW_SIZE = 0
    test.WINDOW_OVERLAP = 0


def _all_keys(node: CN, prefix: str = "") -> list:
    keys = []
    for k, v in node.items():
        name = prefix + k
        keys.extend(_all_keys(v, name + ".") if isinstance(v, CN) else [name])
    return keys


def _unknown_key_error(cfg: CN, key: str, source: str) -> KeyError:
    import difflib

    close = difflib.get_close_matches(key, _all_keys(cfg), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return KeyError(f"{source}: unknown config key {key}{hint}")


def _check_yaml_chain(config_file: str, chain: tuple = ()) -> None:
    """Reads ``config_file`` and its ``_BASE_`` files the way Detectron2 resolves them, so that
    a YAML syntax error, a missing base file or a circular ``_BASE_`` is one error naming the
    file (Detectron2 would recurse until a RecursionError, or raise the parser's traceback).

    Raises:
        ValueError: a syntax error (file, line, column) or a circular chain (listed).
        FileNotFoundError: a ``_BASE_`` file that does not exist.
    """
    import os

    import yaml

    path = os.path.abspath(config_file)
    if path in chain:
        names = " -> ".join(os.path.relpath(p) for p in chain + (path,))
        raise ValueError(f"circular _BASE_ in config files: {names}")
    try:
        with open(config_file) as f:
            content = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"config file {config_file}: YAML syntax error{where}: {problem}") from None
    base = content.get("_BASE_") if isinstance(content, dict) else None
    if not base or "://" in str(base):
        return
    base = os.path.expanduser(str(base))
    if not os.path.isabs(base):
        base = os.path.join(os.path.dirname(config_file), base)
    if not os.path.isfile(base):
        raise FileNotFoundError(f"config file {config_file}: its _BASE_ {base} does not exist")
    _check_yaml_chain(base, chain + (path,))


def get_maskformer_cfg(config_file: str = "", opts=()) -> CN:
    """Detectron2's defaults + DeepLab's + :func:`add_maskformer2_config` +
    :func:`add_maskformer2_video_config`, then ``config_file``
    and ``opts`` (``[KEY, VALUE, ...]``) merged in. Unknown keys raise ``KeyError`` naming the key,
    where it came from and the closest known keys."""
    import os
    import re

    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    add_maskformer2_video_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file not found: {config_file}")
        _check_yaml_chain(config_file)
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, AssertionError) as e:
            m = re.search(r"Non-existent config key: ([\w.]+)", str(e))
            if m:
                raise _unknown_key_error(cfg, m.group(1), config_file) from None
            raise
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(f"config overrides must be KEY VALUE pairs; got an odd count: {opts}")
    known = set(_all_keys(cfg))
    for key in opts[0::2]:
        if key not in known:
            raise _unknown_key_error(cfg, key, "command-line override")
    cfg.merge_from_list(opts)
    from .data.datasets.custom import register_custom_datasets

    # Here, where every process of a run builds its config: spawned workers register them too.
    register_custom_datasets(cfg)
    from .accel.precision import precision_dtype

    precision_dtype(cfg.MODEL.MASK_FORMER.TEST.PRECISION)  # ValueError naming the key
    return cfg


def get_cpu_tool_cfg(config_file: str, opts=(), **model_overrides) -> CN:
    """:func:`get_maskformer_cfg` for a command-line tool that runs on the CPU: an unknown key
    raises ``ValueError`` (one line naming it, like the other user errors) instead of
    ``KeyError``; ``MODEL.DEVICE`` is "cpu" and each ``MODEL.<KEY>=value`` of ``model_overrides``
    is set."""
    try:
        cfg = get_maskformer_cfg(config_file, opts)
    except KeyError as e:  # unknown config key: the message names it and suggests others
        raise ValueError(e.args[0] if e.args else str(e)) from None
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    for key, value in model_overrides.items():
        setattr(cfg.MODEL, key, value)
    cfg.freeze()
    return cfg


# (config key, registry module, registry attribute) of every name the model is built from.
_REGISTERED_NAMES = (
    ("MODEL.META_ARCHITECTURE", "detectron2.modeling", "META_ARCH_REGISTRY"),
    ("MODEL.BACKBONE.NAME", "detectron2.modeling", "BACKBONE_REGISTRY"),
    ("MODEL.SEM_SEG_HEAD.NAME", "detectron2.modeling", "SEM_SEG_HEADS_REGISTRY"),
    (
        "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME",
        "mask2former_d2.modeling.pixel_decoder.build",
        "PIXEL_DECODER_REGISTRY",
    ),
    (
        "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME",
        "mask2former_d2.modeling.transformer_decoder.build",
        "TRANSFORMER_DECODER_REGISTRY",
    ),
)
# Keys whose value must be a positive integer (a torch reshape or layer error otherwise).
_POSITIVE_INTS = (
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES",
    "MODEL.MASK_FORMER.HIDDEN_DIM",
    "MODEL.MASK_FORMER.NHEADS",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
    "MODEL.MASK_FORMER.DEC_LAYERS",
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS",
    "MODEL.SEM_SEG_HEAD.CONVS_DIM",
    "MODEL.SEM_SEG_HEAD.MASK_DIM",
)
# (channels key, heads key, the pixel decoder it applies to or None for all): attention splits
# the channels evenly over the heads.
_DIVISIBLE = (
    ("MODEL.MASK_FORMER.HIDDEN_DIM", "MODEL.MASK_FORMER.NHEADS", None),
    ("MODEL.SEM_SEG_HEAD.CONVS_DIM", "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS",
     "MSDeformAttnPixelDecoder"),
)


def _get(cfg: CN, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _unknown_name(what: str, name: str, known, listed: bool = True) -> str:
    import difflib

    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    if listed:
        return f"{what}: unknown name {name!r}{hint} (registered: {', '.join(known)})"
    return f"{what}: unknown dataset {name!r}{hint} ({len(known)} datasets are registered)"


def _positive(value, *, allow_zero: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return value >= 0 if allow_zero else value > 0


def _dataset_classes(cfg: CN, name: str):
    """(number of classes the model must predict for dataset ``name``, which metadata field
    says so), from its registered metadata; (None, "") when the metadata lists no classes."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(name)
    things, stuff = meta.get("thing_classes"), meta.get("stuff_classes")
    # Instance segmentation (images and videos) predicts the things only; semantic and panoptic
    # segmentation the stuff list, which holds the things too in Detectron2's panoptic metadata.
    instance = "instance" in cfg.INPUT.DATASET_MAPPER_NAME or cfg.MODEL.META_ARCHITECTURE == "VideoMaskFormer"
    if instance and things:
        return len(things), "thing_classes"
    if stuff:
        return len(stuff), "stuff_classes"
    if things:
        return len(things), "thing_classes"
    return None, ""


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"MODEL.DEVICE {device!r} is not a device; expected cpu, cuda or cuda:N") from None
    if parsed.type != "cuda" or device == "cuda":  # plain "cuda" falls back to the CPU
        return
    if not torch.cuda.is_available():
        raise ValueError(
            f"MODEL.DEVICE {device}: CUDA is not available on this machine; use MODEL.DEVICE cpu"
        )
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(
            f"MODEL.DEVICE {device}: only {torch.cuda.device_count()} CUDA devices are visible "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )


def validate_cfg(cfg: CN, *, datasets: bool = True, num_processes: int = 1, training: bool = True) -> None:
    """The one validation pass over a merged config, before anything is built or read: the
    values that would otherwise fail deep inside Detectron2 or torch (or silently do nothing).

    Checked: the registered names the model is built from; the sizes that must be positive;
    ``INPUT.FORMAT``; ``MODEL.DEVICE``; with ``training``, the solver (``SOLVER.IMS_PER_BATCH``
    positive and divisible by ``num_processes``, ``SOLVER.MAX_ITER``,
    ``SOLVER.CHECKPOINT_PERIOD``); with ``datasets``, the names in ``DATASETS.TRAIN`` /
    ``DATASETS.TEST`` and that ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` covers their classes.

    Raises:
        ValueError: naming the key, the value and what is expected (close names suggested).
    """
    import importlib

    from detectron2.data import DatasetCatalog

    import mask2former_d2.modeling  # noqa: F401  (registers the model's components)

    for key, module, attr in _REGISTERED_NAMES:
        registry = getattr(importlib.import_module(module), attr)
        name = _get(cfg, key)
        if name not in registry:
            raise ValueError(_unknown_name(key, name, [k for k, _ in registry]))
    for key in _POSITIVE_INTS:
        value = _get(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{key} must be a positive integer; got {value!r}")
    for dim_key, heads_key, decoder in _DIVISIBLE:
        dim, heads = _get(cfg, dim_key), _get(cfg, heads_key)
        if decoder not in (None, cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME):
            continue
        if isinstance(heads, int) and heads > 0 and dim % heads:
            raise ValueError(
                f"{dim_key} {dim} is not divisible by {heads_key} {heads}: attention splits the channels "
                "evenly over the heads"
            )
    if not isinstance(cfg.DATALOADER.NUM_WORKERS, int) or cfg.DATALOADER.NUM_WORKERS < 0:
        raise ValueError(f"DATALOADER.NUM_WORKERS must be >= 0 (0: load in the main process); "
                         f"got {cfg.DATALOADER.NUM_WORKERS!r}")
    inp = cfg.INPUT
    if inp.FORMAT not in ("BGR", "RGB"):
        raise ValueError(
            f"INPUT.FORMAT {inp.FORMAT!r} is not supported: the model takes 3-channel images, "
            "INPUT.FORMAT BGR or RGB (as its MODEL.PIXEL_MEAN / PIXEL_STD are given)"
        )
    sizes = [("INPUT.IMAGE_SIZE", inp.IMAGE_SIZE, False), ("INPUT.MAX_SIZE_TRAIN", inp.MAX_SIZE_TRAIN, False),
             ("INPUT.MAX_SIZE_TEST", inp.MAX_SIZE_TEST, False),
             # 0 keeps test images at their own size, as in Detectron2.
             ("INPUT.MIN_SIZE_TEST", inp.MIN_SIZE_TEST, True)]
    train_sizes = inp.MIN_SIZE_TRAIN if isinstance(inp.MIN_SIZE_TRAIN, (list, tuple)) else [inp.MIN_SIZE_TRAIN]
    sizes += [("INPUT.MIN_SIZE_TRAIN", v, False) for v in train_sizes]
    for key, value, zero_ok in sizes:
        if not _positive(value, allow_zero=zero_ok):
            expected = ">= 0 (0: no resizing)" if zero_ok else "> 0"
            shown = tuple(train_sizes) if key == "INPUT.MIN_SIZE_TRAIN" else value
            raise ValueError(f"{key} must be {expected}; got {shown!r}")
    _check_device(cfg.MODEL.DEVICE)
    if training:
        solver = cfg.SOLVER
        batch = solver.IMS_PER_BATCH
        if not _positive(batch) or not isinstance(batch, int):
            raise ValueError(f"SOLVER.IMS_PER_BATCH must be a positive integer; got {batch!r}")
        if batch % num_processes:
            raise ValueError(
                f"SOLVER.IMS_PER_BATCH {batch} is not divisible by the {num_processes} processes "
                f"(--num-gpus x --num-machines); use a multiple of {num_processes}"
            )
        for key in ("SOLVER.MAX_ITER", "SOLVER.CHECKPOINT_PERIOD"):
            value = _get(cfg, key)
            if not _positive(value) or not isinstance(value, int):
                raise ValueError(f"{key} must be a positive integer; got {value!r}")
        lr = solver.BASE_LR
        if not _positive(lr) or lr != lr or lr == float("inf"):
            raise ValueError(f"SOLVER.BASE_LR must be a positive finite number; got {lr!r}")
    if datasets:
        registered = DatasetCatalog.list()
        for key in ("DATASETS.TRAIN", "DATASETS.TEST"):
            for name in _get(cfg, key):
                if name not in registered:
                    raise ValueError(_unknown_name(key, name, registered, listed=False))
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        # Inference reads only the test datasets (their metadata names the classes); the
        # training sets a config inherits are not used then.
        for key in ("DATASETS.TRAIN", "DATASETS.TEST") if training else ("DATASETS.TEST",):
            for name in _get(cfg, key):
                needed, field = _dataset_classes(cfg, name)
                if needed is not None and num_classes < needed:
                    raise ValueError(
                        f"MODEL.SEM_SEG_HEAD.NUM_CLASSES {num_classes} is smaller than the {needed} "
                        f"classes of {key} {name!r} (its metadata's {field}); set "
                        f"MODEL.SEM_SEG_HEAD.NUM_CLASSES {needed}"
                    )
