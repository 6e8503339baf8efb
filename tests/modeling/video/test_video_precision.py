"""VideoMaskFormer honours MODEL.MASK_FORMER.TEST.PRECISION (its backbone runs in bf16, its
outputs stay close to float32) and trains through the image model's precision handling (the
criterion sees float32 predictions under autocast)."""
import unittest

import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from mask2former_d2.accel.precision import emulate_low_precision
from tests.modeling.video.common import build_video, make_clip, video_cfg


def _record_dtypes(module: torch.nn.Module, into: list) -> None:
    def hook(_module, _inputs, output):
        into.extend(v.dtype for v in output.values())

    module.register_forward_hook(hook)


def _decode(model, clip):
    """(Q, K+1) class logits and (Q, T, Hm, Wm) mask logits of one clip."""
    frames = model._input_images([clip])
    cls, embed, mask_features = model._decode_clip(frames, model._padded_size(frames))
    return cls, torch.einsum("qe,tehw->qthw", embed, mask_features.float())


class TestVideoPrecision(unittest.TestCase):
    def test_bf16_backbone_and_outputs_close_to_fp32(self):
        reference = build_video().eval()
        clip = make_clip(3, 64, 96, seed=1)
        with torch.no_grad():
            expected = reference([clip])
            expected_cls, expected_logits = _decode(reference, clip)
        with emulate_low_precision():
            model = build_model(video_cfg("MODEL.MASK_FORMER.TEST.PRECISION", "bf16")).eval()
            model.load_state_dict(reference.state_dict())
            backbone_dtypes: list = []
            _record_dtypes(model.backbone, backbone_dtypes)
            with torch.no_grad():
                got = model([clip])
                cls, logits = _decode(model, clip)
        self.assertEqual(set(backbone_dtypes), {torch.bfloat16})
        self.assertEqual((cls.dtype, logits.dtype), (torch.float32, torch.float32))
        # bf16 keeps 8 bits of mantissa: this random tiny model's logits move by a few percent
        # of their size (a float32 backbone by nothing).
        self.assertLess(float((cls - expected_cls).abs().max()), 0.2 * float(expected_cls.abs().max()))
        self.assertLess(float((logits - expected_logits).abs().mean()), 0.1 * float(expected_logits.abs().mean()))
        # The best (query, class) pairs and their scores barely move.
        self.assertEqual(got["pred_labels"][:3], expected["pred_labels"][:3])
        torch.testing.assert_close(
            torch.tensor(got["pred_scores"]), torch.tensor(expected["pred_scores"]), rtol=0, atol=2e-2
        )

    def test_training_under_autocast_gives_the_criterion_float32(self):
        model = build_video().train()
        seen = []
        forward = model.criterion.forward

        def spy(outputs, targets):
            seen.append(outputs["pred_masks"].dtype)
            return forward(outputs, targets)

        model.criterion.forward = spy
        clip = make_clip(2, 64, 64, with_targets=True)
        with EventStorage(), torch.autocast("cpu", dtype=torch.bfloat16):
            losses = model([clip])
        self.assertEqual(seen, [torch.float32])
        self.assertTrue(all(v.dtype == torch.float32 for v in losses.values()))


if __name__ == "__main__":
    unittest.main()
