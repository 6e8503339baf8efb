"""Tests of VideoMaskFormer: inference output, chunked = unchunked, checkpoints, training."""
import os
import pickle
import tempfile
import unittest
from collections import OrderedDict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

from tests.common import CheckpointFormatsMixin, check_training_losses, tiny_cfg
from tests.modeling.video.common import build_video, make_clip


class _Checkpointer(DetectionCheckpointer):
    """Detectron2's checkpointer, keeping the incompatible keys of the last load (strict check)."""

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def _load(model, path):
    ck = _Checkpointer(model)
    ck.load(path)
    return ck.incompatible


def _run(model, clip):
    with torch.no_grad():
        return model([clip])


class TestInference(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = build_video().eval()
        # Odd sizes: padding, crop and a resize to another output size are all exercised.
        cls.clip = make_clip(5, 61, 90)
        cls.clip.update(height=45, width=70)
        cls.out = _run(cls.model, cls.clip)

    def test_output_format(self):
        out = self.out
        self.assertEqual(out["image_size"], (45, 70))
        self.assertEqual(len(out["pred_scores"]), 10)
        self.assertEqual(len(out["pred_labels"]), 10)
        self.assertEqual(len(out["pred_masks"]), 10)
        for m in out["pred_masks"]:
            self.assertEqual(m.dtype, torch.bool)
            self.assertEqual(tuple(m.shape), (5, 45, 70))
        self.assertEqual(out["pred_scores"], sorted(out["pred_scores"], reverse=True))
        self.assertTrue(all(0 <= lab < 40 for lab in out["pred_labels"]))

    def test_masks_follow_published_resize_chain(self):
        # Reference: the published order on the whole clip at once (all T x H x W logits).
        model = self.model
        frames = model._input_images([self.clip])
        padded = model._padded_size(frames)
        cls_logits, embed, mask_features = model._decode_clip(frames, padded)
        mask_logits = torch.einsum("qe,tehw->qthw", embed, mask_features)
        scores = cls_logits.softmax(-1)[:, :-1]
        top, idx = scores.flatten().topk(10)
        low = mask_logits[idx // 40]
        up = torch.nn.functional.interpolate(low, size=padded, mode="bilinear", align_corners=False)
        up = up[:, :, :61, :90]
        up = torch.nn.functional.interpolate(up, size=(45, 70), mode="bilinear", align_corners=False)
        expected = up > 0
        got = torch.stack(self.out["pred_masks"])
        agree = (got == expected).float().mean().item()
        self.assertGreater(agree, 0.9999)
        torch.testing.assert_close(torch.tensor(self.out["pred_scores"]), top)

    def test_chunked_equals_unchunked(self):
        outs = []
        for chunk in (0, 2, 1):
            self.model.frame_chunk_size = chunk
            try:
                outs.append(_run(self.model, self.clip))
            finally:
                self.model.frame_chunk_size = 8
        ref = outs[0]
        for out in outs[1:]:
            self.assertEqual(out["pred_labels"], ref["pred_labels"])
            torch.testing.assert_close(torch.tensor(out["pred_scores"]), torch.tensor(ref["pred_scores"]))
            for a, b in zip(out["pred_masks"], ref["pred_masks"]):
                self.assertLessEqual((a != b).sum().item(), 2)  # float rounding at most

    def test_one_video_per_batch(self):
        with self.assertRaisesRegex(ValueError, "one video per batch"):
            self.model([self.clip, self.clip])

    def test_bad_frames_are_a_clear_error(self):
        with self.assertRaisesRegex(ValueError, r"\['image'\]\[1\] must be a \(3, H, W\) tensor"):
            self.model([{"image": [torch.zeros(3, 8, 8), torch.zeros(8, 8)]}])
        with self.assertRaisesRegex(ValueError, r"\['image'\] must be a non-empty list"):
            self.model([{"image": torch.zeros(3, 8, 8)}])


class TestCheckpoints(CheckpointFormatsMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = build_video(seed=1).eval()
        cls.clip = make_clip(3, 64, 64)
        cls.ref = _run(cls.model, cls.clip)

    def check_checkpoint(self, path):
        fresh = build_video(seed=2).eval()
        inc = _load(fresh, path)
        self.assertEqual(list(inc.missing_keys), [])
        self.assertEqual(list(inc.unexpected_keys), [])
        self.assertEqual(list(inc.incorrect_shapes), [])
        out = _run(fresh, self.clip)
        self.assertEqual(out["pred_labels"], self.ref["pred_labels"])
        torch.testing.assert_close(torch.tensor(out["pred_scores"]), torch.tensor(self.ref["pred_scores"]))

    def test_image_instance_checkpoint_loads_unchanged(self):
        # A COCO instance Mask2Former (80 classes) -> the video model with 80 classes.
        image = build_model(
            tiny_cfg("MODEL.SEM_SEG_HEAD.NUM_CLASSES", 80, "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", False)
        )
        video = build_video("MODEL.SEM_SEG_HEAD.NUM_CLASSES", 80)
        self.assertEqual(sorted(image.state_dict()), sorted(video.state_dict()))
        for with_metadata in (True, False):
            with self.subTest(with_metadata=with_metadata), tempfile.TemporaryDirectory() as d:
                sd = image.state_dict()
                data = OrderedDict((k, v.numpy()) for k, v in sd.items())
                if with_metadata:
                    data._metadata = sd._metadata
                path = os.path.join(d, "coco_instance.pkl")
                with open(path, "wb") as f:
                    pickle.dump({"model": data, "__author__": "test"}, f)
                inc = _load(video, path)
                self.assertEqual((list(inc.missing_keys), list(inc.unexpected_keys)), ([], []))
                self.assertEqual(list(inc.incorrect_shapes), [])
                for k, v in video.state_dict().items():
                    torch.testing.assert_close(v, sd[k], msg=k)


class TestTraining(unittest.TestCase):
    def test_losses_backward_and_overfit(self):
        model = build_video("MODEL.MASK_FORMER.TRAIN_NUM_POINTS", 512)
        model.train()
        clips = [make_clip(2, 32, 48, seed=0, with_targets=True), make_clip(2, 32, 48, seed=1, with_targets=True)]
        with EventStorage():
            losses = model(clips)
            check_training_losses(self, model, losses, num_aux=2)  # DEC_LAYERS 3

            opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
            history = []
            for _ in range(6):
                opt.zero_grad()
                total = sum(model(clips[:1]).values())
                total.backward()
                opt.step()
                history.append(total.item())
        self.assertLess(sum(history[-2:]) / 2, 0.8 * sum(history[:2]) / 2, history)

    def test_targets_from_mapper_format(self):
        model = build_video()
        clip = make_clip(2, 40, 40, with_targets=True, tracks=3)
        # A fourth track absent from every frame is dropped.
        for t, inst in enumerate(clip["instances"]):
            clip["instances"][t] = Instances(
                inst.image_size,
                gt_ids=torch.cat([inst.gt_ids, torch.tensor([-1])]),
                gt_classes=torch.cat([inst.gt_classes, torch.tensor([7])]),
                gt_masks=torch.cat([inst.gt_masks, torch.zeros(1, 40, 40, dtype=torch.bool)]),
            )
        images = type("I", (), {"tensor": torch.zeros(2, 3, 64, 64)})()
        (t,) = model.prepare_targets([clip], images)
        self.assertEqual(t["labels"].tolist(), [0, 1, 2])
        self.assertEqual(tuple(t["masks"].shape), (3, 2, 64, 64))
        self.assertEqual(t["ids"].tolist(), [[0, 0], [1, 1], [-1, 2]])
        self.assertTrue(t["masks"][:, 1, :40, :40].equal(clip["instances"][1].gt_masks[:3]))
        self.assertFalse(t["masks"][2, 0].any())


if __name__ == "__main__":
    unittest.main()
