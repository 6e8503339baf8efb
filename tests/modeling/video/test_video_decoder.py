"""The video transformer decoder and the 3-D sine position encoding."""
import math
import unittest

import torch

from mask2former_d2.layers.position_encoding import (
    PositionEmbeddingSine,
    PositionEmbeddingSine3D,
)
from mask2former_d2.modeling.transformer_decoder.build import build_transformer_decoder
from tests.modeling.video.common import video_cfg


def _naive_3d(t_len, h, w, feats, temperature=10000.0):
    """PARITY_NOTES 14, element by element: (T, 2F, H, W)."""
    out = torch.zeros(t_len, 2 * feats, h, w, dtype=torch.float64)
    scale, eps = 2 * math.pi, 1e-6

    def enc(pos, n, i):
        freq = temperature ** (2 * (i // 2) / n)
        return math.sin(pos / freq) if i % 2 == 0 else math.cos(pos / freq)

    for t in range(t_len):
        z = (t + 1) / (t_len + eps) * scale
        for y in range(h):
            yy = (y + 1) / (h + eps) * scale
            for x in range(w):
                xx = (x + 1) / (w + eps) * scale
                for c in range(2 * feats):
                    spatial = enc(yy, feats, c) if c < feats else enc(xx, feats, c - feats)
                    out[t, c, y, x] = spatial + enc(z, 2 * feats, c)
    return out


class TestPositionEmbeddingSine3D(unittest.TestCase):
    def test_against_naive(self):
        pe = PositionEmbeddingSine3D(4, normalize=True)
        got = pe(torch.zeros(2, 3, 5, 4, 6))
        self.assertEqual(tuple(got.shape), (2, 3, 8, 4, 6))
        torch.testing.assert_close(got[1].double(), _naive_3d(3, 4, 6, 4), atol=1e-5, rtol=0)
        torch.testing.assert_close(got[0], got[1])

    def test_mask_path_equals_maskless(self):
        pe = PositionEmbeddingSine3D(4, normalize=True)
        x = torch.zeros(1, 3, 2, 4, 5)
        torch.testing.assert_close(pe(x, torch.zeros(1, 3, 4, 5, dtype=torch.bool)), pe(x))

    def test_depends_on_clip_length_and_extends_2d(self):
        pe = PositionEmbeddingSine3D(4, normalize=True)
        two = pe(torch.zeros(1, 2, 1, 3, 3))
        three = pe(torch.zeros(1, 3, 1, 3, 3))
        self.assertFalse(torch.allclose(two[0, 0], three[0, 0]))
        # Spatial part = the 2-D encoding: differences between frames are constant over pixels.
        spatial = PositionEmbeddingSine(4, normalize=True)(torch.zeros(1, 1, 3, 3))[0]
        diff = three[0] - spatial
        torch.testing.assert_close(diff, diff[:, :, :1, :1].expand_as(diff))


class TestVideoDecoder(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.cfg = video_cfg()
        self.dec = build_transformer_decoder(self.cfg, 32)

    def _inputs(self, frames, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = [torch.randn(frames, 32, s, s + 1, generator=g) for s in (2, 4, 8)]
        mf = torch.randn(frames, 32, 16, 18, generator=g)
        return x, mf

    def test_same_parameters_as_image_decoder(self):
        image_cfg = self.cfg.clone()
        image_cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
        image = build_transformer_decoder(image_cfg, 32)
        self.assertEqual(
            {k: tuple(v.shape) for k, v in image.state_dict().items()},
            {k: tuple(v.shape) for k, v in self.dec.state_dict().items()},
        )

    def test_eval_shapes_and_train_layout(self):
        self.dec.eval()
        x, mf = self._inputs(5)
        with torch.no_grad():
            out = self.dec(x, mf)
        self.assertEqual(tuple(out["pred_logits"].shape), (1, 8, 41))
        self.assertEqual(tuple(out["pred_masks"].shape), (1, 8, 5, 16, 18))
        self.dec.train()
        x, mf = self._inputs(4)  # 2 clips of SAMPLING_FRAME_NUM = 2
        out = self.dec(x, mf)
        self.assertEqual(tuple(out["pred_masks"].shape), (2, 8, 2, 16, 18))
        self.assertEqual(len(out["aux_outputs"]), 2)
        self.assertEqual(tuple(out["aux_outputs"][0]["pred_masks"].shape), (2, 8, 2, 16, 18))
        with self.assertRaisesRegex(ValueError, "SAMPLING_FRAME_NUM"):
            self.dec(*self._inputs(3))

    def test_clips_of_a_batch_are_independent(self):
        # Training batch of 2 clips == each clip alone (memory of a clip never mixes clips).
        self.dec.train()
        x, mf = self._inputs(4)
        both = self.dec(x, mf)["pred_masks"]
        second = self.dec([f[2:] for f in x], mf[2:])["pred_masks"]
        torch.testing.assert_close(both[1:], second, atol=1e-4, rtol=1e-4)

    def test_eval_path_equals_training_path(self):
        # Eval computes attention masks from resized mask features (cheaper order); the final
        # prediction equals the one of the training path.
        self.dec.num_frames = 3
        x, mf = self._inputs(3)
        self.dec.train()
        with torch.no_grad():
            train = self.dec(x, mf)
        self.dec.eval()
        with torch.no_grad():
            ev = self.dec(x, mf)
        torch.testing.assert_close(ev["pred_masks"], train["pred_masks"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ev["pred_logits"], train["pred_logits"], atol=1e-4, rtol=1e-4)

    def test_final_mask_embeddings_instead_of_masks(self):
        self.dec.eval()
        x, mf = self._inputs(3)
        with torch.no_grad():
            full = self.dec(x, mf)
            lazy = self.dec(x, mf, final_masks=False)
        self.assertNotIn("pred_masks", lazy)
        torch.testing.assert_close(lazy["pred_logits"], full["pred_logits"])
        masks = torch.einsum("bqe,tehw->bqthw", lazy["pred_mask_embed"], mf)
        torch.testing.assert_close(masks, full["pred_masks"], atol=1e-4, rtol=1e-4)
        self.dec.train()
        with self.assertRaisesRegex(ValueError, "eval mode"):
            self.dec(*self._inputs(2), final_masks=False)


if __name__ == "__main__":
    unittest.main()
