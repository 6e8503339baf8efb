"""Frozen batch norms folded into convolutions at inference: same outputs, untouched state."""
import copy
import io
import unittest

import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone

from mask2former_d2.accel.fold_bn import FoldedBNConv2d, fold_batchnorm
from mask2former_d2.config import get_maskformer_cfg
from tests.common import ROOT

R50 = f"{ROOT}/configs/coco/panoptic-segmentation/maskformer2_R50_bs16_50ep.yaml"


def r50(**opts):
    extra = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]
    for k, v in opts.items():
        extra += [k, v]
    return build_backbone(get_maskformer_cfg(R50, extra))


def randomize_norms(backbone, seed):
    """Non-trivial frozen statistics (a fresh model has mean 0, var 1, weight 1, bias 0)."""
    g = torch.Generator().manual_seed(seed)
    for m in backbone.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.numel()
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


class TestFoldFrozenBN(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.backbone = r50().eval()
        randomize_norms(self.backbone, 0)
        self.keys = sorted(self.backbone.state_dict())
        self.count = fold_batchnorm(self.backbone)
        self.x = torch.randn(1, 3, 96, 128)

    def outputs(self, grad: bool):
        with torch.set_grad_enabled(grad):
            return {k: v.detach() for k, v in self.backbone(self.x).items()}

    def assert_close_outputs(self, got, expected):
        for k in expected:
            scale = expected[k].abs().max().item()
            torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-5 * scale)

    def test_folds_every_frozen_norm_and_keeps_state_dict(self):
        self.assertEqual(self.count, 53)  # stem + 16 bottlenecks x 3 + 4 shortcuts
        self.assertEqual(sorted(self.backbone.state_dict()), self.keys)
        self.assertEqual(fold_batchnorm(self.backbone), 0)  # already folded

    def test_same_outputs_as_unfolded(self):
        folded = self.outputs(grad=False)
        plain = self.outputs(grad=True)  # autograd on: the unfolded Conv2d path
        self.assert_close_outputs(folded, plain)
        # The folding is real: not bit-identical to the two-pass computation.
        self.assertFalse(all(torch.equal(folded[k], plain[k]) for k in plain))

    def test_cache_follows_loaded_weights(self):
        self.outputs(grad=False)  # fills the caches
        other = r50().eval()
        randomize_norms(other, 1)
        self.backbone.load_state_dict(other.state_dict())
        with torch.no_grad():
            expected = other(self.x)  # never folded
        self.assert_close_outputs(self.outputs(grad=False), expected)

    def test_copy_and_pickle(self):
        expected = self.outputs(grad=False)
        clone = copy.deepcopy(self.backbone)
        buf = io.BytesIO()
        torch.save(self.backbone, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for model in (clone, loaded):
            convs = [m for m in model.modules() if isinstance(m, FoldedBNConv2d)]
            self.assertEqual(len(convs), 53)
            with torch.no_grad():
                got = model(self.x)
            self.assert_close_outputs(got, expected)

    def test_eval_mode_batchnorm(self):
        """A backbone with trainable (Sync)BatchNorm: folded in eval mode, and in training mode
        it keeps normalising with the batch statistics, under no_grad too."""
        for norm in ("BN", "SyncBN"):
            with self.subTest(norm=norm):
                torch.manual_seed(0)
                backbone = r50(**{"MODEL.RESNETS.NORM": norm})
                g = torch.Generator().manual_seed(2)
                for m in backbone.modules():
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                        c = m.num_features
                        m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
                        m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
                        m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                        m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                plain = copy.deepcopy(backbone).eval()
                self.assertEqual(fold_batchnorm(backbone), 53)
                backbone.eval()
                with torch.no_grad():
                    expected, got = plain(self.x), backbone(self.x)
                self.assert_close_outputs(got, expected)
                self.assertFalse(all(torch.equal(got[k], expected[k]) for k in expected))
                # Training mode: batch statistics, exactly the unfolded computation.
                backbone.train()
                plain.train()
                with torch.no_grad():
                    expected, got = plain(self.x), backbone(self.x)
                for k in expected:
                    torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)

    def test_other_norms_untouched(self):
        gn = r50(**{"MODEL.RESNETS.NORM": "GN"})
        self.assertEqual(fold_batchnorm(gn), 0)


if __name__ == "__main__":
    unittest.main()
