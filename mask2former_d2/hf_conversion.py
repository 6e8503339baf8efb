"""Weights and configs between Hugging Face ``transformers`` and this project's models.

Two architectures map, each with a Swin (any size) or a ResNet backbone:

- ``Mask2FormerForUniversalSegmentation`` <-> ``MaskFormer`` meta-architecture with
  ``MSDeformAttnPixelDecoder`` + ``MultiScaleMaskedTransformerDecoder``;
- ``MaskFormerForInstanceSegmentation`` <-> ``MaskFormer`` with ``BasePixelDecoder`` +
  ``StandardTransformerDecoder`` (DETR decoder on ``res5``).

The ResNets that ``transformers``' ``ResNetConfig`` can express are the bottleneck ResNets with a
7x7 stem, one group, a bottleneck a quarter of the block width and no dilation or deformable
convolution (Detectron2's R50/R101/R152, with the stride in the 3x3 or, ``downsample_in_bottleneck``,
in the 1x1 convolution). The DeepLab
stem of ``R101c`` (three 3x3 convolutions) has no counterpart and is refused.

The mapping is a list of rules built from the architecture's sizes: each rule pairs one tensor
here with one tensor there, or (attention projections) one fused ``(3C, C)`` tensor here with
the three ``(C, C)`` query/key/value tensors there, concatenated along dim 0 in that order. Hugging
Face names are first brought to one canonical spelling (:func:`canonical_hf_key`) so that the
names of several ``transformers`` versions and of its two Swin implementations map the same way.

Hugging Face -> here reads the folder's files directly (``safetensors``, no ``transformers``);
``transformers`` is imported only to build its configs and models (here -> Hugging Face).
Shapes: C channels; tensors are only renamed, split or concatenated, never cast.
"""
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "ConversionReport", "UnsupportedArchitecture", "canonical_hf_key", "Arch",
    "arch_from_hf_config", "arch_from_d2_cfg", "d2_opts_from_arch", "hf_config_from_arch",
    "hf_to_d2_state_dict", "d2_to_hf_state_dict", "read_hf_folder", "d2_cfg_for_arch", "hf_folder_to_d2",
    "d2_to_hf_model",
]

HF_ENC = "model.pixel_level_module.encoder."
HF_PIX = "model.pixel_level_module.decoder."
HF_TR = "model.transformer_module."
M2F_PIX = "sem_seg_head.pixel_decoder."
M2F_TR = "sem_seg_head.predictor."


class UnsupportedArchitecture(ValueError):
    """The checkpoint's architecture has no counterpart on the other side."""


@dataclass
class ConversionReport:
    """What happened to every key: ``mapped`` (source key(s) -> target key), ``skipped``
    (key, reason) and ``unplaced`` (source keys no rule takes, target keys nothing fills)."""

    mapped: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    unplaced: List[str] = field(default_factory=list)

    def lines(self) -> List[str]:
        """One line per key, for the converters' report files."""
        out = [f"mapped    {src} -> {dst}" for src, dst in self.mapped]
        out += [f"skipped   {key}  ({why})" for key, why in self.skipped]
        out += [f"unplaced  {key}" for key in self.unplaced]
        return out

    def summary(self) -> str:
        return f"{len(self.mapped)} mapped, {len(self.skipped)} skipped, {len(self.unplaced)} unplaced"


# --------------------------------------------------------------------------- names
# (pattern, replacement) applied in order; each brings one spelling to the canonical one.
_CANONICAL = [
    # transformers 4.x Mask2Former Swin / MaskFormer Swin / AutoBackbone prefixes -> "...encoder.swin."
    (r"^model\.pixel_level_module\.encoder\.model\.", HF_ENC + "swin."),
    (r"^model\.pixel_level_module\.encoder\.(embeddings|encoder\.layers|layernorm)\b", HF_ENC + r"swin.\1"),
    # Swin attention/MLP spellings (BERT-style in MaskFormerSwin and transformers 4.x).
    (r"\.attention\.self\.(query|key|value)\.", lambda m: f".attention.{m.group(1)[0]}_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.attention\.self\.relative_position_", ".attention.relative_position_bias.relative_position_"),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"(blocks\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
    # MaskFormerSwin numbers its output norms 0..3, SwinBackbone names them stage1..4.
    (r"\.hidden_states_norms\.(\d)\.", lambda m: f".hidden_states_norms.stage{int(m.group(1)) + 1}."),
    # DETR decoder: out_proj / o_proj, fc1 / mlp.fc1.
    (r"(decoder\.layers\.\d+\.(?:self_attn|encoder_attn))\.out_proj\.", r"\1.o_proj."),
    (r"(transformer_module\.decoder\.layers\.\d+\.)(fc[12])\.", r"\1mlp.\2."),
]


def canonical_hf_key(key: str) -> str:
    """The spelling of Hugging Face key ``key`` that the rules use (``transformers`` 5 names)."""
    for pattern, repl in _CANONICAL:
        key = re.sub(pattern, repl, key)
    return key


# ---------------------------------------------------------------------- architecture
@dataclass
class Arch:
    """The sizes that decide every tensor's name and shape, on both sides.

    ``kind`` is ``"mask2former"`` or ``"maskformer"``; ``backbone`` ``"swin"`` or ``"resnet"``.
    """

    kind: str
    backbone: str
    num_classes: int
    num_queries: int
    hidden_dim: int
    conv_dim: int
    mask_dim: int
    num_heads: int
    dim_feedforward: int
    dec_layers: int  # Mask2Former: DEC_LAYERS (layers + 1); MaskFormer: decoder layers
    enc_layers: int = 0  # pixel-decoder encoder layers (Mask2Former)
    pre_norm: bool = False
    enforce_input_proj: bool = False
    dropout: float = 0.0
    swin: Dict[str, Any] = field(default_factory=dict)
    resnet: Dict[str, Any] = field(default_factory=dict)
    class_names: List[str] = field(default_factory=list)
    pixel_mean: Optional[List[float]] = None  # 0-255 RGB
    pixel_std: Optional[List[float]] = None
    test_size: Optional[Tuple[int, int]] = None  # shortest, longest edge at inference
    loss: Dict[str, float] = field(default_factory=dict)  # MODEL.MASK_FORMER.<key> -> value


_ENCODER_DIM_FEEDFORWARD = 1024  # fixed in the published pixel decoder
# Training settings kept across (MODEL.MASK_FORMER key -> transformers config key, per kind).
_LOSS_KEYS = {
    "mask2former": {
        "NO_OBJECT_WEIGHT": "no_object_weight", "CLASS_WEIGHT": "class_weight", "MASK_WEIGHT": "mask_weight",
        "DICE_WEIGHT": "dice_weight", "TRAIN_NUM_POINTS": "train_num_points",
        "OVERSAMPLE_RATIO": "oversample_ratio", "IMPORTANCE_SAMPLE_RATIO": "importance_sample_ratio",
    },
    "maskformer": {
        "NO_OBJECT_WEIGHT": "no_object_weight", "CLASS_WEIGHT": "cross_entropy_weight",
        "MASK_WEIGHT": "mask_weight", "DICE_WEIGHT": "dice_weight",
    },
}
_RESNET_DEPTHS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return cfg.get(name, default) if isinstance(cfg, dict) else getattr(cfg, name, default)


def _refuse(what: str) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(what)


def _class_names(config: Any, num_classes: int) -> List[str]:
    id2label = _get(config, "id2label") or {}
    return [str(id2label.get(i, id2label.get(str(i), f"class_{i}"))) for i in range(num_classes)]


def _swin_from_hf(bb: Any) -> Dict[str, Any]:
    checks = {
        "num_channels": (_get(bb, "num_channels", 3), 3),
        "use_absolute_embeddings": (bool(_get(bb, "use_absolute_embeddings", False)), False),
        "hidden_act": (_get(bb, "hidden_act", "gelu"), "gelu"),
        "layer_norm_eps": (_get(bb, "layer_norm_eps", 1e-5), 1e-5),
        "qkv_bias": (bool(_get(bb, "qkv_bias", True)), True),
    }
    for name, (have, want) in checks.items():
        if have != want:
            raise _refuse(f"Swin backbone with {name}={have!r}: this project's Swin has {want!r}")
    out = list(_get(bb, "out_features") or [])
    if out != ["stage1", "stage2", "stage3", "stage4"]:
        raise _refuse(f"Swin backbone with out_features={out}: expected the four stages stage1..stage4")
    return {
        "embed_dim": int(_get(bb, "embed_dim", 96)),
        "depths": list(_get(bb, "depths")),
        "num_heads": list(_get(bb, "num_heads")),
        "window_size": int(_get(bb, "window_size")),
        "mlp_ratio": float(_get(bb, "mlp_ratio", 4.0)),
        "patch_size": int(_get(bb, "patch_size", 4)),
        "pretrain_img_size": int(_get(bb, "image_size", 224)),
        "drop_path_rate": float(_get(bb, "drop_path_rate", 0.3)),
    }


def _resnet_from_hf(bb: Any) -> Dict[str, Any]:
    depths = list(_get(bb, "depths"))
    hidden = list(_get(bb, "hidden_sizes"))
    emb = int(_get(bb, "embedding_size", 64))
    if _get(bb, "layer_type", "bottleneck") != "bottleneck":
        raise _refuse(f"ResNet layer_type={_get(bb, 'layer_type')!r}: only bottleneck ResNets map to Detectron2's")
    if _get(bb, "hidden_act", "relu") != "relu" or _get(bb, "num_channels", 3) != 3:
        raise _refuse("ResNet with a non-ReLU activation or non-RGB input: no Detectron2 counterpart")
    if _get(bb, "downsample_in_first_stage", False):
        raise _refuse("ResNet with downsample_in_first_stage=True: Detectron2's res2 has stride 1")
    if hidden != [hidden[0] * 2**i for i in range(4)] or hidden[0] != 4 * emb:
        raise _refuse(
            f"ResNet hidden_sizes={hidden} with embedding_size={emb}: Detectron2 needs 4x{emb} doubling per stage"
        )
    out = list(_get(bb, "out_features") or [])
    if out != ["stage1", "stage2", "stage3", "stage4"]:
        raise _refuse(f"ResNet backbone with out_features={out}: expected stage1..stage4")
    depth = {tuple(v): k for k, v in _RESNET_DEPTHS.items()}.get(tuple(depths))
    if depth is None:
        raise _refuse(f"ResNet depths={depths}: Detectron2 builds {sorted(_RESNET_DEPTHS)} only ({_RESNET_DEPTHS})")
    return {
        "depth": depth, "depths": depths, "stem_out_channels": emb, "res2_out_channels": hidden[0],
        "stride_in_1x1": bool(_get(bb, "downsample_in_bottleneck", False)),
    }


def arch_from_hf_config(config: Any, preprocessor: Optional[Dict[str, Any]] = None) -> Arch:
    """The :class:`Arch` of a Hugging Face Mask2Former / MaskFormer config (object or dict).

    Raises:
        UnsupportedArchitecture: naming the setting that has no counterpart here.
    """
    kind = _get(config, "model_type")
    if kind not in ("mask2former", "maskformer"):
        raise _refuse(f"model_type={kind!r}: expected 'mask2former' or 'maskformer'")
    if _get(config, "use_timm_backbone", False) or _get(config, "backbone") and not _get(config, "backbone_config"):
        raise _refuse(f"a timm/named backbone ({_get(config, 'backbone')!r}): only Swin and ResNet configs map")
    bb = _get(config, "backbone_config")
    bb_type = _get(bb, "model_type")
    arch_kw: Dict[str, Any] = {}
    if bb_type in ("swin", "maskformer-swin"):
        arch_kw["backbone"], arch_kw["swin"] = "swin", _swin_from_hf(bb)
    elif bb_type == "resnet":
        arch_kw["backbone"], arch_kw["resnet"] = "resnet", _resnet_from_hf(bb)
    else:
        raise _refuse(f"backbone model_type={bb_type!r}: only 'swin', 'maskformer-swin' and 'resnet' map")
    num_classes = int(_get(config, "num_labels", len(_get(config, "id2label") or {})))
    if kind == "mask2former":
        if tuple(_get(config, "feature_strides", (4, 8, 16, 32))) != (4, 8, 16, 32):
            raise _refuse(f"feature_strides={_get(config, 'feature_strides')}: expected (4, 8, 16, 32)")
        if _get(config, "activation_function", "relu") != "relu":
            raise _refuse(f"activation_function={_get(config, 'activation_function')!r}: the decoders use relu")
        if int(_get(config, "encoder_feedforward_dim", 1024)) != _ENCODER_DIM_FEEDFORWARD:
            raise _refuse(
                f"encoder_feedforward_dim={_get(config, 'encoder_feedforward_dim')}: the pixel decoder's is "
                f"{_ENCODER_DIM_FEEDFORWARD}"
            )
        arch = Arch(
            kind=kind, num_classes=num_classes, num_queries=int(_get(config, "num_queries", 100)),
            hidden_dim=int(_get(config, "hidden_dim", 256)), conv_dim=int(_get(config, "feature_size", 256)),
            mask_dim=int(_get(config, "mask_feature_size", 256)),
            num_heads=int(_get(config, "num_attention_heads", 8)),
            dim_feedforward=int(_get(config, "dim_feedforward", 2048)),
            dec_layers=int(_get(config, "decoder_layers", 10)), enc_layers=int(_get(config, "encoder_layers", 6)),
            pre_norm=bool(_get(config, "pre_norm", False)),
            enforce_input_proj=bool(_get(config, "enforce_input_projection", False)),
            dropout=float(_get(config, "dropout", 0.0)),
            **arch_kw,
        )
        if int(_get(config, "common_stride", 4)) != 4:
            raise _refuse(f"common_stride={_get(config, 'common_stride')}: expected 4")
    else:
        dec = _get(config, "decoder_config")
        if _get(dec, "model_type", "detr") != "detr":
            raise _refuse(f"MaskFormer decoder model_type={_get(dec, 'model_type')!r}: expected 'detr'")
        if _get(dec, "activation_function", "relu") != "relu":
            raise _refuse(f"decoder activation_function={_get(dec, 'activation_function')!r}: expected relu")
        arch = Arch(
            kind=kind, num_classes=num_classes, num_queries=int(_get(dec, "num_queries", 100)),
            hidden_dim=int(_get(dec, "d_model")), conv_dim=int(_get(config, "fpn_feature_size", 256)),
            mask_dim=int(_get(config, "mask_feature_size", 256)),
            num_heads=int(_get(dec, "decoder_attention_heads")), dim_feedforward=int(_get(dec, "decoder_ffn_dim")),
            dec_layers=int(_get(dec, "decoder_layers")), dropout=float(_get(dec, "dropout", 0.1)),
            **arch_kw,
        )
    arch.class_names = _class_names(config, num_classes)
    for ours, theirs in _LOSS_KEYS[kind].items():
        if _get(config, theirs) is not None:
            arch.loss[ours] = _get(config, theirs)
    if preprocessor:
        mean, std = preprocessor.get("image_mean"), preprocessor.get("image_std")
        scale = 255.0 if preprocessor.get("do_rescale", True) else 1.0
        if mean and std:
            arch.pixel_mean = [float(m) * scale for m in mean]
            arch.pixel_std = [float(s) * scale for s in std]
        size = preprocessor.get("size") or {}
        if isinstance(size, dict) and size.get("shortest_edge") and size.get("longest_edge"):
            arch.test_size = (int(size["shortest_edge"]), int(size["longest_edge"]))
    return arch


def arch_from_d2_cfg(cfg: Any, class_names: Optional[Sequence[str]] = None) -> Arch:
    """The :class:`Arch` of a Detectron2 config of this project.

    Raises:
        UnsupportedArchitecture: naming the config key whose value has no counterpart in
            ``transformers``.
    """
    m, head, mf = cfg.MODEL, cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.MASK_FORMER
    if m.META_ARCHITECTURE != "MaskFormer":
        raise _refuse(f"MODEL.META_ARCHITECTURE={m.META_ARCHITECTURE}: only the image model (MaskFormer) maps")
    pair = (head.PIXEL_DECODER_NAME, mf.TRANSFORMER_DECODER_NAME)
    if pair == ("MSDeformAttnPixelDecoder", "MultiScaleMaskedTransformerDecoder"):
        kind = "mask2former"
        if list(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES) != ["res3", "res4", "res5"]:
            raise _refuse(
                "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES="
                f"{list(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES)}: transformers uses res3-res5"
            )
        if head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS != 4 or head.COMMON_STRIDE != 4:
            raise _refuse("MODEL.SEM_SEG_HEAD N_POINTS/COMMON_STRIDE other than 4: transformers fixes both at 4")
    elif pair == ("BasePixelDecoder", "StandardTransformerDecoder"):
        kind = "maskformer"
        # (BasePixelDecoder ignores SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS.)
        if mf.TRANSFORMER_IN_FEATURE != "res5" or mf.ENC_LAYERS != 0:
            raise _refuse(
                f"MaskFormer with TRANSFORMER_IN_FEATURE={mf.TRANSFORMER_IN_FEATURE}, ENC_LAYERS={mf.ENC_LAYERS}: "
                "transformers' MaskFormer decodes res5 without an encoder"
            )
        if mf.PRE_NORM:
            raise _refuse("MODEL.MASK_FORMER.PRE_NORM=True: transformers' DETR decoder is post-norm")
    else:
        raise _refuse(f"pixel/transformer decoders {pair}: transformers has Mask2Former's and MaskFormer's only")
    if head.NORM != "GN":
        raise _refuse(f"MODEL.SEM_SEG_HEAD.NORM={head.NORM}: transformers' pixel decoders use GroupNorm")
    if list(head.IN_FEATURES) != ["res2", "res3", "res4", "res5"]:
        raise _refuse(f"MODEL.SEM_SEG_HEAD.IN_FEATURES={list(head.IN_FEATURES)}: expected res2-res5")
    kw: Dict[str, Any] = {}
    if m.BACKBONE.NAME == "D2SwinTransformer":
        s = m.SWIN
        if s.APE or not s.PATCH_NORM or not s.QKV_BIAS or s.QK_SCALE is not None:
            raise _refuse(
                "MODEL.SWIN APE/PATCH_NORM/QKV_BIAS/QK_SCALE off the defaults: transformers' Swin cannot express it"
            )
        if list(s.OUT_FEATURES) != ["res2", "res3", "res4", "res5"]:
            raise _refuse(f"MODEL.SWIN.OUT_FEATURES={list(s.OUT_FEATURES)}: expected res2-res5")
        kw["backbone"] = "swin"
        kw["swin"] = {
            "embed_dim": s.EMBED_DIM, "depths": list(s.DEPTHS), "num_heads": list(s.NUM_HEADS),
            "window_size": s.WINDOW_SIZE, "mlp_ratio": float(s.MLP_RATIO), "patch_size": s.PATCH_SIZE,
            "pretrain_img_size": s.PRETRAIN_IMG_SIZE, "drop_path_rate": float(s.DROP_PATH_RATE),
        }
    elif m.BACKBONE.NAME in ("build_resnet_backbone", "build_resnet_deeplab_backbone"):
        r = m.RESNETS
        problems = []
        if m.BACKBONE.NAME == "build_resnet_deeplab_backbone" and r.get("STEM_TYPE", "basic") != "basic":
            problems.append(f"STEM_TYPE={r.STEM_TYPE} (transformers' ResNet has the 7x7 stem only)")
        # transformers' bottleneck is a quarter of the block's output width, in one group.
        if r.NUM_GROUPS != 1 or 4 * r.WIDTH_PER_GROUP != r.RES2_OUT_CHANNELS:
            problems.append(
                f"NUM_GROUPS={r.NUM_GROUPS}, WIDTH_PER_GROUP={r.WIDTH_PER_GROUP} (expected 1 and RES2_OUT_CHANNELS/4)"
            )
        if r.RES5_DILATION != 1 or any(r.DEFORM_ON_PER_STAGE):
            problems.append("RES5_DILATION/DEFORM_ON_PER_STAGE")
        if r.DEPTH not in _RESNET_DEPTHS:
            problems.append(f"DEPTH={r.DEPTH}")
        if r.RES2_OUT_CHANNELS != 4 * r.STEM_OUT_CHANNELS:
            problems.append(f"RES2_OUT_CHANNELS={r.RES2_OUT_CHANNELS} != 4 x STEM_OUT_CHANNELS")
        if list(r.OUT_FEATURES) != ["res2", "res3", "res4", "res5"]:
            problems.append(f"OUT_FEATURES={list(r.OUT_FEATURES)}")
        if problems:
            raise _refuse(f"MODEL.RESNETS {'; '.join(problems)}: transformers' ResNet cannot express it")
        kw["backbone"] = "resnet"
        kw["resnet"] = {
            "depth": r.DEPTH, "depths": _RESNET_DEPTHS[r.DEPTH], "stem_out_channels": r.STEM_OUT_CHANNELS,
            "res2_out_channels": r.RES2_OUT_CHANNELS, "stride_in_1x1": bool(r.STRIDE_IN_1X1),
        }
    else:
        raise _refuse(f"MODEL.BACKBONE.NAME={m.BACKBONE.NAME}: transformers' models take Swin or ResNet")
    num_classes = head.NUM_CLASSES
    names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes}")
    return Arch(
        kind=kind, num_classes=num_classes, num_queries=mf.NUM_OBJECT_QUERIES, hidden_dim=mf.HIDDEN_DIM,
        conv_dim=head.CONVS_DIM, mask_dim=head.MASK_DIM, num_heads=mf.NHEADS,
        dim_feedforward=mf.DIM_FEEDFORWARD, dec_layers=mf.DEC_LAYERS, enc_layers=head.TRANSFORMER_ENC_LAYERS,
        pre_norm=bool(mf.PRE_NORM), enforce_input_proj=bool(mf.ENFORCE_INPUT_PROJ), dropout=float(mf.DROPOUT),
        class_names=names, pixel_mean=list(m.PIXEL_MEAN), pixel_std=list(m.PIXEL_STD),
        loss={k: mf[k] for k in _LOSS_KEYS[kind]}, **kw,
    )


def d2_opts_from_arch(arch: Arch) -> List[Any]:
    """``[KEY, VALUE, ...]`` overrides that, merged over ``configs/Base-Mask2Former.yaml``
    (Mask2Former) or ``configs/maskformer/Base-MaskFormer.yaml`` (MaskFormer), build ``arch``."""
    opts: List[Any] = [
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", arch.num_classes,
        "MODEL.SEM_SEG_HEAD.CONVS_DIM", arch.conv_dim,
        "MODEL.SEM_SEG_HEAD.MASK_DIM", arch.mask_dim,
        "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", arch.num_queries,
        "MODEL.MASK_FORMER.HIDDEN_DIM", arch.hidden_dim,
        "MODEL.MASK_FORMER.NHEADS", arch.num_heads,
        "MODEL.MASK_FORMER.DIM_FEEDFORWARD", arch.dim_feedforward,
        "MODEL.MASK_FORMER.DEC_LAYERS", arch.dec_layers,
        "MODEL.MASK_FORMER.DROPOUT", arch.dropout,
    ]
    if arch.kind == "mask2former":
        opts += [
            "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", arch.enc_layers,
            "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS", arch.num_heads,
            "MODEL.MASK_FORMER.PRE_NORM", arch.pre_norm,
            "MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ", arch.enforce_input_proj,
        ]
    if arch.backbone == "swin":
        s = arch.swin
        opts += [
            "MODEL.BACKBONE.NAME", "D2SwinTransformer",
            "MODEL.SWIN.EMBED_DIM", s["embed_dim"], "MODEL.SWIN.DEPTHS", list(s["depths"]),
            "MODEL.SWIN.NUM_HEADS", list(s["num_heads"]), "MODEL.SWIN.WINDOW_SIZE", s["window_size"],
            "MODEL.SWIN.MLP_RATIO", s["mlp_ratio"], "MODEL.SWIN.PATCH_SIZE", s["patch_size"],
            "MODEL.SWIN.PRETRAIN_IMG_SIZE", s["pretrain_img_size"],
            "MODEL.SWIN.DROP_PATH_RATE", s["drop_path_rate"],
        ]
    else:
        r = arch.resnet
        opts += [
            "MODEL.BACKBONE.NAME", "build_resnet_backbone", "MODEL.RESNETS.DEPTH", r["depth"],
            "MODEL.RESNETS.STEM_OUT_CHANNELS", r["stem_out_channels"],
            "MODEL.RESNETS.RES2_OUT_CHANNELS", r["res2_out_channels"],
            "MODEL.RESNETS.WIDTH_PER_GROUP", r["res2_out_channels"] // 4, "MODEL.RESNETS.NUM_GROUPS", 1,
            "MODEL.RESNETS.STRIDE_IN_1X1", r["stride_in_1x1"],
        ]
    if arch.pixel_mean is not None:
        opts += ["MODEL.PIXEL_MEAN", list(arch.pixel_mean), "MODEL.PIXEL_STD", list(arch.pixel_std)]
    if arch.test_size is not None:
        opts += ["INPUT.MIN_SIZE_TEST", arch.test_size[0], "INPUT.MAX_SIZE_TEST", arch.test_size[1]]
    for key, value in arch.loss.items():
        opts += [f"MODEL.MASK_FORMER.{key}", value]
    return opts


def hf_config_from_arch(arch: Arch) -> Any:
    """A ``transformers`` ``Mask2FormerConfig`` / ``MaskFormerConfig`` for ``arch``."""
    import transformers as tf

    labels = {i: n for i, n in enumerate(arch.class_names)}
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if arch.backbone == "swin":
        s = arch.swin
        swin_cls = tf.SwinConfig if arch.kind == "mask2former" else tf.MaskFormerSwinConfig
        backbone = swin_cls(
            image_size=s["pretrain_img_size"], patch_size=s["patch_size"], embed_dim=s["embed_dim"],
            depths=list(s["depths"]), num_heads=list(s["num_heads"]), window_size=s["window_size"],
            mlp_ratio=s["mlp_ratio"], drop_path_rate=s["drop_path_rate"], out_features=stages,
        )
    else:
        r = arch.resnet
        backbone = tf.ResNetConfig(
            embedding_size=r["stem_out_channels"], depths=list(r["depths"]), layer_type="bottleneck",
            hidden_sizes=[r["res2_out_channels"] * 2**i for i in range(4)],
            downsample_in_bottleneck=r["stride_in_1x1"], out_features=stages,
        )
    if arch.kind == "mask2former":
        return tf.Mask2FormerConfig(
            backbone_config=backbone, feature_size=arch.conv_dim, mask_feature_size=arch.mask_dim,
            hidden_dim=arch.hidden_dim, encoder_feedforward_dim=_ENCODER_DIM_FEEDFORWARD,
            encoder_layers=arch.enc_layers, decoder_layers=arch.dec_layers, num_attention_heads=arch.num_heads,
            dim_feedforward=arch.dim_feedforward, pre_norm=arch.pre_norm, dropout=arch.dropout,
            enforce_input_projection=arch.enforce_input_proj, num_queries=arch.num_queries,
            num_labels=arch.num_classes, id2label=labels, label2id={n: i for i, n in labels.items()},
            **{_LOSS_KEYS["mask2former"][k]: v for k, v in arch.loss.items()},
        )
    decoder = {
        "model_type": "detr", "d_model": arch.hidden_dim, "decoder_layers": arch.dec_layers,
        "decoder_attention_heads": arch.num_heads, "decoder_ffn_dim": arch.dim_feedforward,
        "encoder_layers": 0, "num_queries": arch.num_queries, "dropout": arch.dropout,
    }
    return tf.MaskFormerConfig(
        backbone_config=backbone, decoder_config=decoder, fpn_feature_size=arch.conv_dim,
        mask_feature_size=arch.mask_dim, num_labels=arch.num_classes, id2label=labels,
        label2id={n: i for i, n in labels.items()}, **{_LOSS_KEYS["maskformer"][k]: v for k, v in arch.loss.items()},
    )


# ---------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class _Rule:
    d2: str
    hf: Tuple[str, ...]  # one key (copied) or three (query, key, value: d2 = cat along dim 0)


def _pairs(d2: str, hf: str, params: Iterable[str]) -> List[_Rule]:
    return [_Rule(f"{d2}.{p}", (f"{hf}.{p}",)) for p in params]


_WB = ("weight", "bias")
_BN = ("weight", "bias", "running_mean", "running_var")


def _renamed(d2: str, hf: str, names: Iterable[Tuple[str, str]]) -> List[_Rule]:
    """Weight and bias rules of the submodules ``{d2}.{ours}`` <- ``{hf}.{theirs}`` of ``names``."""
    return [rule for ours, theirs in names for rule in _pairs(f"{d2}.{ours}", f"{hf}.{theirs}", _WB)]


def _qkv_rules(d2_attn: str, hf_attn: str) -> List[_Rule]:
    """``nn.MultiheadAttention``'s packed input projection <- transformers' separate q, k, v."""
    return [
        _Rule(f"{d2_attn}.in_proj_{p}", tuple(f"{hf_attn}.{c}_proj.{p}" for c in "qkv")) for p in _WB
    ]


def _prediction_rules(d2_norm: str, hf_norm: str, hf_mask_embedder: str) -> List[_Rule]:
    """The decoder's final norm, the 3-layer mask-embedding MLP and the class head, laid out
    the same way by both heads."""
    rules = _pairs(d2_norm, hf_norm, _WB)
    for i in range(3):
        rules += _pairs(f"{M2F_TR}mask_embed.layers.{i}", f"{hf_mask_embedder}.{i}.0", _WB)
    rules += _pairs(M2F_TR + "class_embed", "class_predictor", _WB)
    return rules


def _swin_rules(arch: Arch) -> List[_Rule]:
    sw = HF_ENC + "swin."
    rules = _pairs("backbone.patch_embed.proj", sw + "embeddings.patch_embeddings.projection", _WB)
    rules += _pairs("backbone.patch_embed.norm", sw + "embeddings.norm", _WB)
    for i, depth in enumerate(arch.swin["depths"]):
        for j in range(depth):
            d, h = f"backbone.layers.{i}.blocks.{j}", f"{sw}encoder.layers.{i}.blocks.{j}"
            rules += _pairs(d + ".norm1", h + ".layernorm_before", _WB)
            rules += _pairs(d + ".norm2", h + ".layernorm_after", _WB)
            rules.append(_Rule(d + ".attn.relative_position_bias_table",
                               (h + ".attention.relative_position_bias.relative_position_bias_table",)))
            for p in _WB:
                rules.append(_Rule(f"{d}.attn.qkv.{p}", tuple(f"{h}.attention.{c}_proj.{p}" for c in "qkv")))
            rules += _pairs(d + ".attn.proj", h + ".attention.o_proj", _WB)
            rules += _pairs(d + ".mlp.fc1", h + ".mlp.fc1", _WB)
            rules += _pairs(d + ".mlp.fc2", h + ".mlp.fc2", _WB)
        if i < 3:
            rules += _pairs(f"backbone.layers.{i}.downsample.reduction", f"{sw}encoder.layers.{i}.downsample.reduction",
                            ("weight",))
            rules += _pairs(f"backbone.layers.{i}.downsample.norm", f"{sw}encoder.layers.{i}.downsample.norm", _WB)
        rules += _pairs(f"backbone.norm{i}", f"{HF_ENC}hidden_states_norms.stage{i + 1}", _WB)
    return rules


def _resnet_rules(arch: Arch) -> List[_Rule]:
    rules = _pairs("backbone.stem.conv1", HF_ENC + "embedder.embedder.convolution", ("weight",))
    rules += _pairs("backbone.stem.conv1.norm", HF_ENC + "embedder.embedder.normalization", _BN)
    for s, depth in enumerate(arch.resnet["depths"]):
        for b in range(depth):
            d, h = f"backbone.res{s + 2}.{b}", f"{HF_ENC}encoder.stages.{s}.layers.{b}"
            if b == 0:
                rules += _pairs(d + ".shortcut", h + ".shortcut.convolution", ("weight",))
                rules += _pairs(d + ".shortcut.norm", h + ".shortcut.normalization", _BN)
            for c in range(3):
                rules += _pairs(f"{d}.conv{c + 1}", f"{h}.layer.{c}.convolution", ("weight",))
                rules += _pairs(f"{d}.conv{c + 1}.norm", f"{h}.layer.{c}.normalization", _BN)
    return rules


def _mask2former_head_rules(arch: Arch) -> List[_Rule]:
    rules = [_Rule(M2F_PIX + "transformer.level_embed", (HF_PIX + "level_embed",))]
    for i in range(3):  # res5, res4, res3: both sides order the input projections coarse to fine
        rules += _pairs(f"{M2F_PIX}input_proj.{i}.0", f"{HF_PIX}input_projections.{i}.0", _WB)
        rules += _pairs(f"{M2F_PIX}input_proj.{i}.1", f"{HF_PIX}input_projections.{i}.1", _WB)
    for i in range(arch.enc_layers):
        d, h = f"{M2F_PIX}transformer.encoder.layers.{i}", f"{HF_PIX}encoder.layers.{i}"
        for part in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
            rules += _pairs(f"{d}.self_attn.{part}", f"{h}.self_attn.{part}", _WB)
        rules += _renamed(d, h, (("norm1", "self_attn_layer_norm"), ("linear1", "fc1"), ("linear2", "fc2"),
                                 ("norm2", "final_layer_norm")))
    rules += _pairs(M2F_PIX + "mask_features", HF_PIX + "mask_projection", _WB)
    # One FPN level (res2) above the encoder's three.
    rules += _pairs(M2F_PIX + "adapter_1", HF_PIX + "adapter_1.0", ("weight",))
    rules += _pairs(M2F_PIX + "adapter_1.norm", HF_PIX + "adapter_1.1", _WB)
    rules += _pairs(M2F_PIX + "layer_1", HF_PIX + "layer_1.0", ("weight",))
    rules += _pairs(M2F_PIX + "layer_1.norm", HF_PIX + "layer_1.1", _WB)

    rules += _pairs(M2F_TR + "query_embed", HF_TR + "queries_embedder", ("weight",))
    rules += _pairs(M2F_TR + "query_feat", HF_TR + "queries_features", ("weight",))
    rules += _pairs(M2F_TR + "level_embed", HF_TR + "level_embed", ("weight",))
    if arch.enforce_input_proj or arch.conv_dim != arch.hidden_dim:
        for i in range(3):
            rules += _pairs(f"{M2F_TR}input_proj.{i}", f"{HF_TR}input_projections.{i}", _WB)
    for i in range(arch.dec_layers - 1):
        h = f"{HF_TR}decoder.layers.{i}"
        sa = f"{M2F_TR}transformer_self_attention_layers.{i}"
        ca = f"{M2F_TR}transformer_cross_attention_layers.{i}"
        ffn = f"{M2F_TR}transformer_ffn_layers.{i}"
        rules += _qkv_rules(f"{sa}.self_attn", f"{h}.self_attn")
        rules += _pairs(f"{sa}.self_attn.out_proj", f"{h}.self_attn.o_proj", _WB)
        rules += _pairs(f"{sa}.norm", f"{h}.self_attn_layer_norm", _WB)
        rules.append(_Rule(f"{ca}.multihead_attn.in_proj_weight", (f"{h}.cross_attn.in_proj_weight",)))
        rules.append(_Rule(f"{ca}.multihead_attn.in_proj_bias", (f"{h}.cross_attn.in_proj_bias",)))
        rules += _pairs(f"{ca}.multihead_attn.out_proj", f"{h}.cross_attn.out_proj", _WB)
        rules += _pairs(f"{ca}.norm", f"{h}.cross_attn_layer_norm", _WB)
        rules += _pairs(f"{ffn}.linear1", f"{h}.mlp.fc1", _WB)
        rules += _pairs(f"{ffn}.linear2", f"{h}.mlp.fc2", _WB)
        rules += _pairs(f"{ffn}.norm", f"{h}.final_layer_norm", _WB)
    rules += _prediction_rules(
        M2F_TR + "decoder_norm", HF_TR + "decoder.layernorm", HF_TR + "decoder.mask_predictor.mask_embedder"
    )
    return rules


def _maskformer_head_rules(arch: Arch) -> List[_Rule]:
    rules = _pairs(M2F_PIX + "layer_4", HF_PIX + "fpn.stem.0", ("weight",))
    rules += _pairs(M2F_PIX + "layer_4.norm", HF_PIX + "fpn.stem.1", _WB)
    # transformers' FPN layers run coarse to fine (res4, res3, res2) = adapter_3, _2, _1 here.
    for i in range(3):
        lvl = 3 - i
        rules += _pairs(f"{M2F_PIX}adapter_{lvl}", f"{HF_PIX}fpn.layers.{i}.proj.0", ("weight",))
        rules += _pairs(f"{M2F_PIX}adapter_{lvl}.norm", f"{HF_PIX}fpn.layers.{i}.proj.1", _WB)
        rules += _pairs(f"{M2F_PIX}layer_{lvl}", f"{HF_PIX}fpn.layers.{i}.block.0", ("weight",))
        rules += _pairs(f"{M2F_PIX}layer_{lvl}.norm", f"{HF_PIX}fpn.layers.{i}.block.1", _WB)
    rules += _pairs(M2F_PIX + "mask_features", HF_PIX + "mask_projection", _WB)

    rules += _pairs(M2F_TR + "query_embed", HF_TR + "queries_embedder", ("weight",))
    rules += _pairs(M2F_TR + "input_proj", HF_TR + "input_projection", _WB)
    for i in range(arch.dec_layers):
        d, h = f"{M2F_TR}transformer.decoder.layers.{i}", f"{HF_TR}decoder.layers.{i}"
        for ours, theirs in (("self_attn", "self_attn"), ("multihead_attn", "encoder_attn")):
            rules += _qkv_rules(f"{d}.{ours}", f"{h}.{theirs}")
            rules += _pairs(f"{d}.{ours}.out_proj", f"{h}.{theirs}.o_proj", _WB)
        rules += _renamed(d, h, (("norm1", "self_attn_layer_norm"), ("norm2", "encoder_attn_layer_norm"),
                                 ("norm3", "final_layer_norm"), ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2")))
    rules += _prediction_rules(M2F_TR + "transformer.decoder.norm", HF_TR + "decoder.layernorm", "mask_embedder")
    return rules


def _rules(arch: Arch) -> List[_Rule]:
    rules = _swin_rules(arch) if arch.backbone == "swin" else _resnet_rules(arch)
    rules += _mask2former_head_rules(arch) if arch.kind == "mask2former" else _maskformer_head_rules(arch)
    # The classification loss's class weights (no-object weight last) exist on both sides.
    rules.append(_Rule("criterion.empty_weight", ("criterion.empty_weight",)))
    return rules


# Keys with no counterpart that are safe to leave out, with the reason reported.
_SKIP_HF = [
    (r"\.relative_position_index$", "buffer computed from the window size"),
    (r"\.num_batches_tracked$", "BatchNorm counter; Detectron2's frozen BatchNorm has none"),
    (r"^model\.pixel_level_module\.encoder\.swin\.layernorm\.", "Swin's final norm, unused by the segmentation model"),
]
_SKIP_D2 = [
    (r"\.relative_position_index$", "buffer computed from the window size"),
    (r"^(pixel_mean|pixel_std)$", "normalisation constants, written to the config"),
    (r"\.num_batches_tracked$", "BatchNorm counter (BN/SyncBN configs), not used at inference"),
]
# Tensors here that a checkpoint there may lack and that the model built here computes.
_DERIVED_D2 = {"criterion.empty_weight": "computed from MODEL.MASK_FORMER.NO_OBJECT_WEIGHT"}


def _skip_reason(key: str, table: List[Tuple[str, str]]) -> Optional[str]:
    for pattern, why in table:
        if re.search(pattern, key):
            return why
    return None


def hf_to_d2_state_dict(hf_sd: Dict[str, torch.Tensor], arch: Arch) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Maps a Hugging Face state dict (any supported spelling) to this project's names.

    Returns:
        The state dict here (tensors shared or concatenated, never cast) and the report. Keys
        that no rule takes and that are not known to be safe to skip are ``unplaced``.
    """
    report = ConversionReport()
    canon: Dict[str, str] = {}
    for key in hf_sd:
        canon.setdefault(canonical_hf_key(key), key)
    used = set()
    out: Dict[str, torch.Tensor] = {}
    for rule in _rules(arch):
        found = [canon.get(k) for k in rule.hf]
        if all(found):
            tensors = [hf_sd[k] for k in found]
            out[rule.d2] = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
            used.update(found)
            report.mapped.append((" + ".join(found), rule.d2))
        elif rule.d2 in _DERIVED_D2 and not any(found):
            report.skipped.append((rule.d2, f"not in the checkpoint; {_DERIVED_D2[rule.d2]}"))
        else:
            report.unplaced.append(f"{rule.d2} (no {', '.join(k for k, f in zip(rule.hf, found) if not f)})")
    for key in hf_sd:
        if key in used:
            continue
        why = _skip_reason(canonical_hf_key(key), _SKIP_HF)
        if why:
            report.skipped.append((key, why))
        else:
            report.unplaced.append(key)
    return out, report


def d2_to_hf_state_dict(
    d2_sd: Dict[str, torch.Tensor], arch: Arch, hf_keys: Iterable[str]
) -> Tuple[Dict[str, torch.Tensor], ConversionReport]:
    """Maps this project's state dict to the names ``hf_keys`` of a ``transformers`` model built
    for ``arch`` (its ``state_dict().keys()``).

    Returns:
        The Hugging Face state dict and the report; target keys nothing fills are ``unplaced``
        unless known to be safe (then ``skipped``: the model keeps its initial value).
    """
    report = ConversionReport()
    hf_keys = list(hf_keys)
    actual = {canonical_hf_key(k): k for k in hf_keys}
    out: Dict[str, torch.Tensor] = {}
    used = set()
    for rule in _rules(arch):
        if rule.d2 not in d2_sd:
            report.unplaced.append(f"{rule.d2} (missing from the checkpoint)")
            continue
        targets = [actual.get(k) for k in rule.hf]
        if not all(targets):
            report.unplaced.append(f"{rule.d2} (the transformers model has no {rule.hf[0]})")
            continue
        tensor = d2_sd[rule.d2]
        parts = [tensor] if len(targets) == 1 else list(torch.chunk(tensor, 3, dim=0))
        for t, p in zip(targets, parts):
            out[t] = p.clone()  # chunks are views into one storage; safetensors wants separate tensors
        used.add(rule.d2)
        report.mapped.append((rule.d2, " + ".join(targets)))
    for key in d2_sd:
        if key in used:
            continue
        why = _skip_reason(key, _SKIP_D2)
        if why:
            report.skipped.append((key, why))
        else:
            report.unplaced.append(key)
    for key in hf_keys:
        if key not in out:
            why = _skip_reason(canonical_hf_key(key), _SKIP_HF)
            if why:
                report.skipped.append((key, f"kept at the transformers model's value: {why}"))
            else:
                report.unplaced.append(f"{key} (nothing maps to it)")
    return out, report


# ------------------------------------------------------------------------ whole models
_BASE_CONFIGS = {
    "mask2former": "configs/Base-Mask2Former.yaml",
    "maskformer": "configs/maskformer/Base-MaskFormer.yaml",
}
_TASKS = {
    "semantic": (True, False, False),
    "instance": (False, True, False),
    "panoptic": (True, True, True),
}


def read_hf_folder(folder: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
    """``config.json``, the weights (``model.safetensors``, sharded safetensors or
    ``pytorch_model.bin``) and ``preprocessor_config.json`` (None if absent) of a Hugging Face
    checkpoint folder, read without ``transformers``.

    Raises:
        FileNotFoundError: naming the folder and the files expected in it.
    """
    import json
    import os

    def path(name: str) -> str:
        return os.path.join(folder, name)

    if not os.path.isfile(path("config.json")):
        raise FileNotFoundError(f"{folder}: no config.json; expected a Hugging Face checkpoint folder")
    with open(path("config.json")) as f:
        config = json.load(f)
    weights: Dict[str, torch.Tensor] = {}
    if os.path.isfile(path("model.safetensors")) or os.path.isfile(path("model.safetensors.index.json")):
        from safetensors.torch import load_file

        files = ["model.safetensors"]
        if not os.path.isfile(path("model.safetensors")):
            with open(path("model.safetensors.index.json")) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        for name in files:
            weights.update(load_file(path(name)))
    elif os.path.isfile(path("pytorch_model.bin")):
        weights = torch.load(path("pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin beside config.json")
    pre = None
    if os.path.isfile(path("preprocessor_config.json")):
        with open(path("preprocessor_config.json")) as f:
            pre = json.load(f)
    return config, weights, pre


def d2_cfg_for_arch(arch: Arch, task: str = "semantic", repo_root: Optional[str] = None) -> Any:
    """The Detectron2 config (this project's base config + :func:`d2_opts_from_arch`) that builds
    ``arch``, with ``task``'s inference outputs switched on."""
    import os

    from .config import get_maskformer_cfg

    if task not in _TASKS:
        raise ValueError(f"task={task!r}; expected one of {sorted(_TASKS)}")
    root = repo_root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sem, ins, pan = _TASKS[task]
    opts = d2_opts_from_arch(arch) + [
        "MODEL.WEIGHTS", "", "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", sem,
        "MODEL.MASK_FORMER.TEST.INSTANCE_ON", ins, "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", pan,
    ]
    return get_maskformer_cfg(os.path.join(root, _BASE_CONFIGS[arch.kind]), opts)


def hf_folder_to_d2(folder: str, task: str = "semantic") -> Tuple[Any, Dict[str, torch.Tensor], Arch, ConversionReport]:
    """Converts a Hugging Face Mask2Former / MaskFormer folder.

    Returns:
        ``(cfg, state_dict, arch, report)``: a config that builds the matching model here and its
        complete state dict (buffers that ``transformers`` does not store are taken from the
        freshly built model and reported as skipped).

    Raises:
        UnsupportedArchitecture: the architecture has no counterpart here.
        ValueError: some weights could not be placed (the report lists them).
    """
    from detectron2.modeling import build_model

    config, weights, pre = read_hf_folder(folder)
    arch = arch_from_hf_config(config, pre)
    cfg = d2_cfg_for_arch(arch, task)
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    sd, report = hf_to_d2_state_dict(weights, arch)
    if report.unplaced:
        raise ValueError(
            f"{folder}: {len(report.unplaced)} weights could not be placed, e.g. {report.unplaced[0]}"
        )
    reference = build_model(cfg).state_dict()
    for key, value in reference.items():
        if key not in sd:
            why = _DERIVED_D2.get(key) or _skip_reason(key, _SKIP_D2)
            if why is None:
                raise ValueError(f"{folder}: nothing in the checkpoint fills {key}")
            sd[key] = value
    extra = sorted(set(sd) - set(reference))
    bad = [k for k in reference if tuple(sd[k].shape) != tuple(reference[k].shape)]
    if extra or bad:
        if extra:
            what = f"unexpected {extra[0]}"
        else:
            what = f"{bad[0]} {tuple(sd[bad[0]].shape)} != {tuple(reference[bad[0]].shape)}"
        raise ValueError(f"{folder}: the converted weights do not fit the model built here: {what}")
    return cfg, {k: sd[k] for k in reference}, arch, report


def d2_to_hf_model(cfg: Any, state_dict: Dict[str, torch.Tensor], class_names: Optional[Sequence[str]] = None):
    """Builds the ``transformers`` model matching ``cfg`` and loads ``state_dict`` (this project's
    names) into it.

    Returns:
        ``(hf_model, arch, report)``; the model is in eval mode.

    Raises:
        UnsupportedArchitecture: the config has no counterpart in ``transformers``.
        ValueError: some weights could not be placed (the report lists them).
    """
    import transformers as tf

    arch = arch_from_d2_cfg(cfg, class_names)
    hf_config = hf_config_from_arch(arch)
    cls = tf.Mask2FormerForUniversalSegmentation if arch.kind == "mask2former" else tf.MaskFormerForInstanceSegmentation
    model = cls(hf_config).eval()
    hf_sd, report = d2_to_hf_state_dict(state_dict, arch, model.state_dict().keys())
    if report.unplaced:
        raise ValueError(f"{len(report.unplaced)} weights could not be placed, e.g. {report.unplaced[0]}")
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    assert not unexpected, unexpected
    kept = {k for k, _ in report.skipped}
    assert set(missing) <= kept, sorted(set(missing) - kept)[:3]
    return model, arch, report
