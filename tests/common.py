"""Shared helpers for the tests: paths, a tiny model config and inputs.

Paths: ``ROOT`` is the repository; ``DATA`` the real data samples (COCO/ADE/Cityscapes/Mapillary
images and annotations, video clips), ``$M2F_DATA`` or ``../shared/data`` beside the repository;
``SHARED`` the shared folder holding the parity fixtures and tools, ``$M2F_SHARED`` or
``../shared``. Tests that need them skip when they are absent.
"""
import importlib.util
import math
import os
import pickle
import subprocess
import sys
import tempfile
import unittest
from collections import OrderedDict
from types import ModuleType
from typing import Callable, List, Sequence, Tuple, TypeVar

import torch
from detectron2.structures import Instances

from mask2former_d2.config import get_maskformer_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "configs", "quickstart", "maskformer2_R18_tiny_coco_panoptic.yaml")
SHARED = os.environ.get("M2F_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
DATA = os.environ.get("M2F_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))


_T = TypeVar("_T")


def in_ci() -> bool:
    """Whether the tests run under continuous integration: ``CI`` set to ``true`` or ``1``, as
    GitHub Actions, GitLab CI and most other services set it."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def requires_fixture(available: bool, reason: str) -> Callable[[_T], _T]:
    """Decorates a test method or ``TestCase`` that needs a shared fixture.

    Outside CI, a missing fixture skips the test with ``reason`` (a clone without ``../shared``).
    Under CI (:func:`in_ci`) it fails instead, naming ``reason``: CI always has the fixtures, so
    a missing one must not pass unnoticed as a skip.
    """
    if available:
        return lambda obj: obj
    if not in_ci():
        return unittest.skip(reason)
    message = f"CI=true but a shared fixture is missing: {reason}"

    def fail(obj):
        if isinstance(obj, type):
            def setUpClass(cls):  # noqa: N802 (unittest's name)
                raise AssertionError(message)

            obj.setUpClass = classmethod(setUpClass)
            return obj

        def failing(*args, **kwargs):
            raise AssertionError(message)

        failing.__name__, failing.__doc__ = obj.__name__, obj.__doc__
        return failing

    return fail


def load_script(relpath: str) -> ModuleType:
    """Imports a script of the repository that is not in a package (``tools/x.py``,
    ``datasets/x.py``) as a module, given its path relative to ``ROOT``."""
    name = "_m2f_" + os.path.splitext(relpath)[0].replace(os.sep, "_").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_parity_fixtures(test: unittest.TestCase, tool: str, fixtures: Sequence[str]) -> None:
    """Runs ``tool check --fixture F`` (a parity tool of ``SHARED/tools``) for each fixture folder,
    as a developer would, with this checkout's package first on ``PYTHONPATH``; each must exit 0
    and print ``PARITY OK``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    for fixture in fixtures:
        with test.subTest(fixture=os.path.basename(fixture)):
            proc = subprocess.run(
                [sys.executable, str(tool), "check", "--fixture", str(fixture)],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
            )
            out = proc.stdout + proc.stderr
            test.assertEqual(proc.returncode, 0, out[-4000:])
            test.assertIn("PARITY OK", proc.stdout, out[-4000:])


def save_checkpoint(model: torch.nn.Module, save_dir: str, fmt: str) -> str:
    """Writes ``model``'s weights into ``save_dir``; returns the file. ``fmt="pth"``: Detectron2's
    checkpointer (tensors, with ``_metadata``); ``fmt="pkl"``: the model-zoo layout (numpy arrays,
    no ``_metadata``, ``matching_heuristics`` False)."""
    if fmt == "pth":
        from detectron2.checkpoint import DetectionCheckpointer

        DetectionCheckpointer(model, save_dir=save_dir).save("model")
        return os.path.join(save_dir, "model.pth")
    if fmt != "pkl":
        raise ValueError(f"fmt={fmt!r}; expected 'pth' or 'pkl'")
    sd = OrderedDict((k, v.numpy()) for k, v in model.state_dict().items())
    assert not hasattr(sd, "_metadata")
    path = os.path.join(save_dir, "model.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": sd, "__author__": "test", "matching_heuristics": False}, f)
    return path


def check_training_losses(test: unittest.TestCase, model: torch.nn.Module, losses: dict, num_aux: int) -> None:
    """Asserts that ``losses`` holds exactly the classification, mask and dice losses and their
    ``num_aux`` auxiliary copies (suffixes ``_0`` .. ``_{num_aux-1}``), that their sum is finite,
    and that its backward pass reaches every trainable parameter of ``model``."""
    expected = {"loss_ce", "loss_mask", "loss_dice"}
    expected |= {f"{k}_{i}" for k in list(expected) for i in range(num_aux)}
    test.assertEqual(set(losses), expected)
    total = sum(losses.values())
    test.assertTrue(torch.isfinite(total))
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    test.assertEqual(no_grad, [])


class CheckpointFormatsMixin:
    """Mixed into a ``unittest.TestCase`` with a ``model`` attribute and a ``check_checkpoint(path)``
    method that loads ``path`` into a fresh model and asserts it matches ``model``: runs that check
    on the model's weights saved in both formats of :func:`save_checkpoint`."""

    def test_pth_with_metadata(self):
        with tempfile.TemporaryDirectory() as d:
            self.check_checkpoint(save_checkpoint(self.model, d, "pth"))

    def test_pkl_without_metadata(self):
        # Model-zoo layout: numpy arrays, no _metadata (the published code drops every
        # pixel-decoder weight here).
        with tempfile.TemporaryDirectory() as d:
            self.check_checkpoint(save_checkpoint(self.model, d, "pkl"))


def new_cfg(**sections):
    """Detectron2's defaults plus the DeepLab and Mask2Former keys, with
    ``sections={"MASK_FORMER": {...}, "SEM_SEG_HEAD": {...}}`` set under ``MODEL``."""
    from detectron2.config import get_cfg
    from detectron2.projects.deeplab import add_deeplab_config

    from mask2former_d2.config import add_maskformer2_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    for section, values in sections.items():
        for key, value in values.items():
            setattr(cfg.MODEL[section], key, value)
    return cfg


def naive_sine_pos(h: int, w: int, channels: int) -> torch.Tensor:
    """DETR's normalised sine position encoding (H, W, C) written from its formula: channel
    i < C/2 encodes y, the rest x; even i use sin, odd i cos, of pos / 10000^(2*floor(i/2)/(C/2)),
    with pos = k / (n + 1e-6) * 2pi for k = 1..n."""
    f = channels // 2
    i = torch.arange(f, dtype=torch.float64)
    dim_t = 10000.0 ** (2 * torch.div(i, 2, rounding_mode="floor") / f)

    def encode(n: int) -> torch.Tensor:
        p = torch.arange(1, n + 1, dtype=torch.float64) / (n + 1e-6) * 2 * math.pi
        a = p[:, None] / dim_t
        return torch.where(i.long() % 2 == 0, a.sin(), a.cos())  # (n, C/2)

    py = encode(h)[:, None, :].expand(h, w, f)
    px = encode(w)[None, :, :].expand(h, w, f)
    return torch.cat([py, px], dim=-1).float()


def reference_mha(attn, q, k, v, num_heads, attn_mask=None, key_padding_mask=None):
    """Sequence-first (L, B, C) multi-head attention with torch's reference implementation,
    using the projection weights of ``attn`` (``nn.MultiheadAttention``'s layout)."""
    from torch.nn import functional as F

    return F.multi_head_attention_forward(
        q, k, v, attn.in_proj_weight.shape[1], num_heads, attn.in_proj_weight, attn.in_proj_bias,
        None, None, False, 0.0, attn.out_proj.weight, attn.out_proj.bias, training=False,
        key_padding_mask=key_padding_mask, need_weights=False, attn_mask=attn_mask,
    )[0]


def tiny_cfg(*opts, config_file: str = TINY_CONFIG):
    """The quick-start config shrunk further for unit tests (random init, CPU)."""
    return get_maskformer_cfg(
        config_file,
        [
            "MODEL.DEVICE", "cpu",
            "MODEL.WEIGHTS", "",
            "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32,
            "MODEL.SEM_SEG_HEAD.MASK_DIM", 32,
            "MODEL.MASK_FORMER.HIDDEN_DIM", 32,
            "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 8,
            "MODEL.MASK_FORMER.DIM_FEEDFORWARD", 64,
            "MODEL.MASK_FORMER.DEC_LAYERS", 3,
            "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", 256,
            "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", True,
            "MODEL.MASK_FORMER.TEST.INSTANCE_ON", True,
            "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", True,
            "DATASETS.TEST", ("coco_2017_val_panoptic_with_sem_seg",),
        ]
        + list(opts),
    )


def make_inputs(
    sizes: Sequence[Tuple[int, int]], num_classes: int = 133, with_targets: bool = False,
    out_sizes: Sequence[Tuple[int, int]] = (), seed: int = 0,
) -> List[dict]:
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i, (h, w) in enumerate(sizes):
        x = {"image": torch.randint(0, 256, (3, h, w), generator=g).float()}
        if out_sizes:
            x["height"], x["width"] = out_sizes[i]
        if with_targets:
            inst = Instances((h, w))
            n = 3
            masks = torch.zeros(n, h, w, dtype=torch.bool)
            for j in range(n):
                y0 = int(torch.randint(0, h // 2, (1,), generator=g))
                x0 = int(torch.randint(0, w // 2, (1,), generator=g))
                masks[j, y0 : y0 + h // 3, x0 : x0 + w // 3] = True
            inst.gt_masks = masks
            inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
            x["instances"] = inst
        batch.append(x)
    return batch
