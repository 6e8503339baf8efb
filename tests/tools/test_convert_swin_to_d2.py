"""Tests of tools/convert_swin_to_d2.py on synthetic checkpoints in the real key layouts."""

import logging
import os
import pickle
import re
import tempfile
import unittest
from typing import Dict

import numpy as np
import torch
from torch import nn

from mask2former_d2.modeling.backbone.swin import D2SwinTransformer, SwinTransformer
from tests.common import load_script

convert = load_script("tools/convert_swin_to_d2.py")

TINY = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=7)
NORMS = sorted(f"norm{i}.{k}" for i in range(4) for k in ("weight", "bias"))


def microsoft_classification_state_dict(model: SwinTransformer) -> Dict[str, torch.Tensor]:
    """What Microsoft's classification code saves for the same weights: no norm{i}, a final
    norm, a classifier head and an attn_mask buffer in every shifted block."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if not re.match(r"norm\d", k)}
    width = model.num_features[-1]
    sd["norm.weight"], sd["norm.bias"] = torch.rand(width), torch.rand(width)
    sd["head.weight"], sd["head.bias"] = torch.randn(10, width), torch.randn(10)
    for i, stage in enumerate(model.layers):
        for j in range(1, len(stage.blocks), 2):
            sd[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, 49, 49)
    return sd


def timm_state_dict(microsoft: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm >= 0.9 layout: merging moved to the next stage, head.fc, non-persistent buffers."""
    out = {}
    for k, v in microsoft.items():
        if k.endswith(("attn_mask", "relative_position_index")):
            continue
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) + 1}.downsample", k)
        out[k.replace("head.", "head.fc.")] = v
    return out


class TestConvertSwin(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        torch.manual_seed(0)
        cls.source = SwinTransformer(**TINY)
        cls.microsoft = microsoft_classification_state_dict(cls.source)

    def assert_loads_into_d2(self, converted: Dict[str, np.ndarray]) -> None:
        torch.manual_seed(1)
        target = D2SwinTransformer(**TINY)
        result = target.load_state_dict(
            {k: torch.from_numpy(v) for k, v in converted.items()}, strict=False
        )
        self.assertEqual(sorted(result.missing_keys), NORMS)
        self.assertEqual(result.unexpected_keys, [])
        loaded = target.state_dict()
        for name, value in self.source.state_dict().items():
            self.assertTrue(torch.equal(loaded[name], value), name)

    def test_layout_detection(self):
        self.assertEqual(convert.detect_layout(self.microsoft), "microsoft")
        self.assertEqual(convert.detect_layout(timm_state_dict(self.microsoft)), "timm")
        with self.assertRaisesRegex(ValueError, "no 'layers"):
            convert.detect_layout(["conv1.weight", "fc.weight"])
        broken = [k for k in self.microsoft if not k.startswith("layers.1.downsample")]
        with self.assertRaisesRegex(ValueError, r"\[0, 2\]"):
            convert.detect_layout(broken)

    def test_microsoft_layout(self):
        converted = convert.convert_swin_state_dict({"model": self.microsoft})
        self.assertFalse(
            [k for k in converted if k.startswith(("head", "norm.")) or "attn_mask" in k]
        )
        self.assertIn("layers.2.downsample.reduction.weight", converted)
        self.assertNotIn("layers.3.downsample.reduction.weight", converted)
        self.assert_loads_into_d2(converted)

    def test_timm_layout(self):
        timm_sd = timm_state_dict(self.microsoft)
        self.assertIn("layers.3.downsample.reduction.weight", timm_sd)
        self.assertIn("head.fc.weight", timm_sd)
        converted = convert.convert_swin_state_dict(timm_sd)
        reference = convert.convert_swin_state_dict(self.microsoft)
        self.assertEqual(sorted(converted), sorted(reference))
        for name, value in reference.items():
            self.assertEqual(converted[name].dtype, value.dtype, name)
            np.testing.assert_array_equal(converted[name], value, err_msg=name)
        self.assert_loads_into_d2(converted)

    def test_wrappers_and_prefixes(self):
        wrapped = {"state_dict": {"module." + k: v for k, v in self.microsoft.items()}}
        self.assert_loads_into_d2(convert.convert_swin_state_dict(wrapped))
        features_only = {
            re.sub(r"^layers\.(\d+)\.", r"layers_\1.", k): v
            for k, v in timm_state_dict(self.microsoft).items()
        }
        self.assert_loads_into_d2(convert.convert_swin_state_dict(features_only))

    def test_absolute_position_embedding(self):
        torch.manual_seed(0)
        model = SwinTransformer(**TINY, ape=True, pretrain_img_size=48)  # grid 12 != C 16
        sd = microsoft_classification_state_dict(model)
        grid = sd["absolute_pos_embed"]  # (1, C, G, G)
        sd["absolute_pos_embed"] = grid.flatten(2).transpose(1, 2)  # classification (1, G*G, C)
        converted = convert.convert_swin_state_dict(sd)
        np.testing.assert_array_equal(converted["absolute_pos_embed"], grid.numpy())
        sd["absolute_pos_embed"] = grid.permute(0, 2, 3, 1)  # channels-last (1, G, G, C)
        converted = convert.convert_swin_state_dict(sd)
        np.testing.assert_array_equal(converted["absolute_pos_embed"], grid.numpy())

    def test_unknown_keys_and_v2(self):
        sd = dict(self.microsoft, **{"layers.0.blocks.0.attn.extra": torch.zeros(1)})
        with self.assertLogs(convert.logger, logging.WARNING) as logs:
            converted = convert.convert_swin_state_dict(sd)
        self.assertNotIn("layers.0.blocks.0.attn.extra", converted)
        self.assertIn("layers.0.blocks.0.attn.extra", "\n".join(logs.output))
        v2 = dict(self.microsoft, **{"layers.0.blocks.0.attn.logit_scale": torch.zeros(1, 1, 1)})
        with self.assertRaisesRegex(ValueError, "V2"):
            convert.convert_swin_state_dict(v2)

    def test_cli_and_detectron2_checkpointer(self):
        from detectron2.checkpoint import DetectionCheckpointer

        with tempfile.TemporaryDirectory() as tmp:
            src, dst = os.path.join(tmp, "swin.pth"), os.path.join(tmp, "swin.pkl")
            torch.save({"model": self.microsoft}, src)
            convert.main([src, dst])
            with open(dst, "rb") as f:
                data = pickle.load(f)
            self.assertEqual(data["__author__"], "third_party")
            self.assertIs(data["matching_heuristics"], True)
            self.assertTrue(all(isinstance(v, np.ndarray) for v in data["model"].values()))

            # a detector-like model: the heuristics must fill backbone.* and touch nothing else
            torch.manual_seed(2)
            model = nn.Module()
            model.backbone = D2SwinTransformer(**TINY)
            model.head = nn.Sequential()
            model.head.norm = nn.LayerNorm(128)
            head_before = model.head.norm.weight.detach().clone()
            norm0_before = model.backbone.norm0.weight.detach().clone()
            DetectionCheckpointer(model).load(dst)
            for name, value in self.source.state_dict().items():
                self.assertTrue(torch.equal(model.backbone.state_dict()[name], value), name)
            self.assertTrue(torch.equal(model.head.norm.weight, head_before))
            self.assertTrue(torch.equal(model.backbone.norm0.weight, norm0_before))

    def test_refuses_arbitrary_pickles_by_default(self):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "swin.pth")
            torch.save({"model": self.microsoft, "config": logging.Formatter()}, src)
            with self.assertRaisesRegex(ValueError, "allow-pickle"):
                convert.load_checkpoint(src)
            self.assertIn(
                "patch_embed.proj.weight", convert.load_checkpoint(src, allow_pickle=True)
            )


if __name__ == "__main__":
    unittest.main()
