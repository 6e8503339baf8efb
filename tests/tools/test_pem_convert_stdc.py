"""tools/convert_stdc_to_d2.py on synthetic checkpoints in STDC-Seg's ImageNet layout."""
import os
import pickle
import tempfile
import unittest

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from mask2former_d2.modeling.backbone.stdc import D2STDCnet
from tests.common import load_script

convert = load_script("tools/convert_stdc_to_d2.py")


def stdc_seg_imagenet_checkpoint(net: D2STDCnet, layers) -> dict:
    """What STDC-Seg's ImageNet training saves for the same weights: every `features` entry also
    under its stage name (x2 .. x32), the classifier (fc, bn, linear), DataParallel's prefix."""
    sd = dict(net.state_dict())
    ends = np.cumsum([1, 1] + list(layers))  # stage Sequentials wrap slices of `features`
    bounds = {"x2": (0, 1), "x4": (1, 2), "x8": (2, ends[2]), "x16": (ends[2], ends[3]), "x32": (ends[3], ends[4])}
    for key, value in list(sd.items()):
        if key.startswith("features."):
            i = int(key.split(".")[1])
            stage = next(s for s, (a, b) in bounds.items() if a <= i < b)
            sd[f"{stage}.0.{key[len('features.'):]}"] = value
    sd["fc.weight"] = torch.randn(1024, 1024)
    sd.update({f"bn.{k}": torch.rand(1024) for k in ("weight", "bias", "running_mean", "running_var")})
    sd["linear.weight"] = torch.randn(1000, 1024)
    return {"state_dict": {"module." + k: v for k, v in sd.items()}}


class _Model(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone


class TestConvertSTDC(unittest.TestCase):
    def check(self, layers, conv_last):
        torch.manual_seed(0)
        source = D2STDCnet(layers=layers, use_conv_last=True)
        with torch.no_grad():
            for p in source.state_dict().values():
                if p.is_floating_point():
                    p.normal_()
        with tempfile.TemporaryDirectory() as d:
            src, out = os.path.join(d, "stdc.tar"), os.path.join(d, "stdc.pkl")
            torch.save(stdc_seg_imagenet_checkpoint(source, layers), src)
            with self.assertLogs(convert.logger, "INFO") as logs:
                convert.main([src, out] + (["--conv-last"] if conv_last else []))
            variant = {(2, 2, 2): "STDC1", (4, 5, 3): "STDC2"}[tuple(layers)]
            self.assertIn(variant, "\n".join(logs.output))
            with open(out, "rb") as f:
                written = pickle.load(f)["model"]
            self.assertFalse([k for k in written if not k.startswith(("features.", "conv_last."))])
            self.assertEqual(any(k.startswith("conv_last.") for k in written), conv_last)

            model = _Model(D2STDCnet(layers=layers, use_conv_last=conv_last))
            ck = DetectionCheckpointer(model)
            inc = ck._load_model(ck._load_file(out))
            self.assertEqual(list(inc.missing_keys), [])
            self.assertEqual(list(inc.incorrect_shapes), [])
        expected = {k: v for k, v in source.state_dict().items() if conv_last or not k.startswith("conv_last.")}
        for name, value in model.backbone.state_dict().items():
            if value.is_floating_point():
                torch.testing.assert_close(value, expected[name], msg=name)

    def test_stdc1_and_stdc2(self):
        self.check([2, 2, 2], conv_last=False)
        self.check([4, 5, 3], conv_last=True)

    def test_not_an_stdc_checkpoint(self):
        with self.assertRaisesRegex(ValueError, "not an STDC checkpoint"):
            convert.convert_stdc_state_dict({"conv1.weight": torch.zeros(1)})

    def test_stage_twins_must_agree(self):
        sd = {"features.0.conv.weight": torch.zeros(2), "x2.0.0.conv.weight": torch.ones(2)}
        with self.assertRaisesRegex(ValueError, "different tensors"):
            convert.convert_stdc_state_dict(sd)


if __name__ == "__main__":
    unittest.main()
