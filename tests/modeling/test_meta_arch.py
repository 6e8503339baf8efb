"""End-to-end behaviour of the MaskFormer meta-architecture on a tiny random model."""
import os
import pickle
import tempfile
import unittest
from collections import OrderedDict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import BitMasks
from detectron2.utils.events import EventStorage
from torch.nn import functional as F

from mask2former_d2.checkpoint import MaskFormerCheckpointer
from mask2former_d2.config import get_maskformer_cfg
from tests.common import CheckpointFormatsMixin, check_training_losses, make_inputs, tiny_cfg


def build(*opts):
    torch.manual_seed(0)
    return build_model(tiny_cfg(*opts))


# The tiny model: COCO panoptic classes (K = 133, things are 0..79), 8 queries.
K, THINGS = 133, set(range(80))


def naive_outputs(
    cls_logits, mask_logits, padded, size, out_size, *, resize_first=True, obj_thr=0.8, overlap_thr=0.8, topk=100
):
    """One image's outputs written from the published method, pixel by pixel where it can be:
    the (Q, h, w) mask logits upsampled to the padded batch, cropped to the image, resized to
    the requested size; then semantic, panoptic and instance inference of a panoptic model.
    Without ``resize_first`` (semantic-only models) semantic inference runs at the image's size
    and its result is resized."""
    h, w = size
    m = F.interpolate(mask_logits[None], size=padded, mode="bilinear", align_corners=False)[:, :, :h, :w]
    prob = cls_logits.softmax(-1)  # (Q, K+1)
    if not resize_first:
        sem = torch.einsum("qk,qhw->khw", prob[:, :K], m[0].sigmoid())
        sem = F.interpolate(sem[None], size=out_size, mode="bilinear", align_corners=False)[0]
        return sem, None, None
    m = F.interpolate(m, size=out_size, mode="bilinear", align_corners=False)[0]
    sig = m.sigmoid()  # (Q, H, W)
    sem = torch.einsum("qk,qhw->khw", prob[:, :K], sig)

    scores, labels = prob.max(-1)
    kept = [q for q in range(len(labels)) if labels[q] != K and scores[q] > obj_thr]
    seg = torch.zeros(out_size, dtype=torch.int32)
    info, stuff_ids = [], {}
    if kept:
        winner = torch.stack([scores[q] * sig[q] for q in kept]).argmax(0)  # index into kept
        for j, q in enumerate(kept):
            label = int(labels[q])
            own, won = sig[q] >= 0.5, winner == j
            segment = won & own
            if not own.any() or not segment.any() or won.sum() / own.sum() < overlap_thr:
                continue
            if label not in THINGS and label in stuff_ids:
                seg[segment] = stuff_ids[label]
                continue
            info.append({"id": len(info) + 1, "isthing": label in THINGS, "category_id": label})
            seg[segment] = len(info)
            if label not in THINGS:
                stuff_ids[label] = len(info)

    detections = []
    flat = prob[:, :K].flatten()
    for score, index in zip(*flat.topk(min(topk, flat.numel()))):
        q, c = divmod(int(index), K)
        if c not in THINGS:
            continue
        mask = m[q] > 0
        mask_score = (sig[q] * mask).sum() / (mask.sum() + 1e-6)
        detections.append((float(score * mask_score), c, mask))
    detections.sort(key=lambda d: -d[0])
    return sem, (seg, info), detections


class _CraftedHead:
    """A forward hook on the head that replaces its predictions: confident classes for some
    queries (things 3 and 7, stuff 100 twice, stuff 120), no-object for one, low scores for the
    rest; mask logits at the network's resolution, one column stripe per confident query plus
    noise. Records what it returned."""

    CLASSES = {0: 3, 1: 7, 2: 3, 3: 100, 4: 100, 5: 120, 6: K}

    def __init__(self, seed=0):
        self.generator = torch.Generator().manual_seed(seed)
        self.outputs = None

    def __call__(self, module, inputs, outputs):
        b, q, _ = outputs["pred_logits"].shape
        logits = torch.randn(b, q, K + 1, generator=self.generator)
        for query, cls in self.CLASSES.items():
            logits[:, query, cls] += 12.0
        masks = torch.randn(outputs["pred_masks"].shape, generator=self.generator)  # (B, Q, h, w)
        stripes = torch.linspace(0, 6, masks.shape[-1]).long().clamp(max=5)  # 6 column stripes
        for query in range(6):  # query j covers stripe j, so it wins most of its own area
            masks[:, query] += torch.where(stripes == query, 6.0, -6.0)
        self.outputs = {**outputs, "pred_logits": logits, "pred_masks": masks}
        return self.outputs


class TestInference(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = build().eval()

    def _check_against_naive(self, model, inputs, head=None, resize_first=True):
        """Runs ``model`` on ``inputs`` recording the head's predictions (or ``head``'s
        replacement of them) and compares every output with :func:`naive_outputs`."""
        seen = {}
        hook = head or (lambda m, i, o: seen.update(outputs=o))
        handle = model.sem_seg_head.register_forward_hook(hook)
        try:
            with torch.no_grad():
                outs = model(inputs)
        finally:
            handle.remove()
        pred = head.outputs if head else seen["outputs"]
        sizes = [tuple(x["image"].shape[-2:]) for x in inputs]
        padded = tuple(-(-max(s[d] for s in sizes) // 32) * 32 for d in (0, 1))
        for i, (x, out) in enumerate(zip(inputs, outs)):
            out_size = (x.get("height", sizes[i][0]), x.get("width", sizes[i][1]))
            sem, panoptic, detections = naive_outputs(
                pred["pred_logits"][i], pred["pred_masks"][i], padded, sizes[i], out_size,
                resize_first=resize_first,
            )
            with self.subTest(image=i):
                if "sem_seg" in out:
                    torch.testing.assert_close(out["sem_seg"], sem, atol=1e-5, rtol=1e-4)
                if "panoptic_seg" not in out:
                    continue
                got_seg, got_info = out["panoptic_seg"]
                seg, info = panoptic
                self.assertEqual(got_info, info)
                self.assertEqual(got_seg.dtype, torch.int32)
                # Bands of rows and whole-image interpolation round differently; a pixel whose
                # sigmoid is 0.5 +- 1e-7 may flip.
                self.assertGreaterEqual(float((got_seg == seg).float().mean()), 0.999)
                inst = out["instances"]
                self.assertEqual(inst.image_size, out_size)
                self.assertEqual(inst.pred_classes.tolist(), [d[1] for d in detections])
                torch.testing.assert_close(inst.scores, torch.tensor([d[0] for d in detections]), atol=1e-5, rtol=1e-4)
                for got, (_, _, mask) in zip(inst.pred_masks, detections):
                    self.assertLessEqual(int((got != mask).sum()), max(1, mask.numel() // 1000))
                boxes = BitMasks(inst.pred_masks).get_bounding_boxes().tensor
                torch.testing.assert_close(inst.pred_boxes.tensor, boxes)
        return outs

    def test_outputs_match_naive_reference(self):
        # Odd input sizes, outputs requested at other sizes, one at its own size; the head's
        # predictions replaced by confident ones so that panoptic inference keeps segments.
        inputs = make_inputs([(75, 99), (64, 50), (41, 57)])
        for x, (h, w) in zip(inputs, [(150, 198), (60, 47)]):
            x["height"], x["width"] = h, w
        outs = self._check_against_naive(self.model, inputs, _CraftedHead())
        self.assertEqual(outs[2]["sem_seg"].shape[1:], (41, 57))
        self.assertTrue(any(s["isthing"] for s in outs[0]["panoptic_seg"][1]))
        self.assertTrue(any(not s["isthing"] for s in outs[0]["panoptic_seg"][1]))
        self.assertGreater(len(outs[0]["instances"]), 0)

    def test_network_outputs_match_naive_reference(self):
        # The random network's own predictions (no confident query: panoptic output empty).
        self._check_against_naive(self.model, make_inputs([(75, 99), (64, 50)], out_sizes=[(70, 90), (64, 50)]))

    def test_batch_equals_single(self):
        inputs = make_inputs([(64, 96), (64, 96)])
        with torch.no_grad():
            both = self.model(inputs)
            one = self.model(inputs[1:])
        torch.testing.assert_close(both[1]["sem_seg"], one[0]["sem_seg"], atol=1e-4, rtol=1e-4)

    def test_channels_last_backbone_input_changes_nothing_but_speed(self):
        """At CPU inference a ResNet gets its input channels-last; the outputs are those of the
        NCHW input up to float rounding. Training keeps the input as it is."""
        x = torch.randn(1, 3, 64, 96)
        self.assertTrue(self.model._backbone_input(x).is_contiguous(memory_format=torch.channels_last))
        self.assertIs(self.model.train()._backbone_input(x), x)
        self.model.eval()
        inputs = make_inputs([(75, 99)])
        with torch.no_grad():
            got = self.model(inputs)[0]
            self.model._backbone_input = lambda t: t  # instance attribute: NCHW as given
            try:
                expected = self.model(inputs)[0]
            finally:
                del self.model._backbone_input
        torch.testing.assert_close(got["sem_seg"], expected["sem_seg"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            got["instances"].scores, expected["instances"].scores, atol=1e-4, rtol=1e-4
        )

    def test_semantic_only(self):
        model = build(
            "MODEL.MASK_FORMER.TEST.INSTANCE_ON", False, "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", False
        ).eval()
        # Semantic only: semantic inference at the image's size, then resized.
        outs = self._check_against_naive(model, make_inputs([(70, 90)], out_sizes=[(35, 45)]), resize_first=False)
        self.assertEqual(set(outs[0]), {"sem_seg"})

    def test_bad_image_is_named(self):
        with self.assertRaisesRegex(ValueError, r"batched_inputs\[0\]\['image'\] must be a \(3, H, W\)"):
            self.model([{"image": torch.zeros(64, 64)}])


class TestTraining(unittest.TestCase):
    def test_losses_and_every_param_gets_grad(self):
        model = build()
        model.train()
        with EventStorage():
            losses = model(make_inputs([(64, 96), (64, 95)], with_targets=True))
        # DEC_LAYERS 3: the prediction before the first layer + 2 layers, all but the last auxiliary.
        check_training_losses(self, model, losses, num_aux=2)

    def test_image_without_targets(self):
        # No segment: every query's target is no-object, so loss_ce is the plain cross entropy
        # to class K (the no-object weight cancels out of the weighted mean) times CLASS_WEIGHT,
        # and the mask losses are zero.
        model = build()
        model.train()
        batch = make_inputs([(64, 64)], with_targets=True)
        inst = batch[0]["instances"]
        batch[0]["instances"] = inst[torch.zeros(len(inst), dtype=torch.bool)]
        seen = {}
        model.sem_seg_head.register_forward_hook(lambda m, i, o: seen.update(outputs=o))
        with EventStorage():
            losses = model(batch)
        out = seen["outputs"]
        predictions = [out] + list(out["aux_outputs"])
        self.assertEqual(len(predictions), 3)
        for i, pred in enumerate(predictions):
            suffix = "" if i == 0 else f"_{i - 1}"
            logits = pred["pred_logits"].detach()  # (B, Q, K+1)
            expected = 2.0 * F.cross_entropy(logits.flatten(0, 1), torch.full((logits.shape[0] * logits.shape[1],), K))
            torch.testing.assert_close(losses["loss_ce" + suffix].detach(), expected)
            self.assertEqual(float(losses["loss_mask" + suffix]), 0.0)
            self.assertEqual(float(losses["loss_dice" + suffix]), 0.0)


class TestCheckpoints(CheckpointFormatsMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = build().eval()
        cls.inputs = make_inputs([(64, 80)])
        with torch.no_grad():
            cls.reference = cls.model(cls.inputs)[0]["sem_seg"]

    def check_checkpoint(self, path):
        fresh = build("MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 8).eval()
        torch.manual_seed(123)
        for p in fresh.parameters():
            torch.nn.init.normal_(p)
        ck = MaskFormerCheckpointer(fresh)
        ck.load(path)
        inc = ck.last_incompatible
        self.assertEqual(inc.missing_keys, [])
        self.assertEqual(inc.unexpected_keys, [])
        with torch.no_grad():
            got = fresh(self.inputs)[0]["sem_seg"]
        torch.testing.assert_close(got, self.reference)

    def test_version1_layout_is_upgraded(self):
        # First-release MaskFormer checkpoints hold pixel-decoder keys directly under the head.
        sd = OrderedDict()
        for k, v in self.model.state_dict().items():
            sd[k.replace("sem_seg_head.pixel_decoder.", "sem_seg_head.")] = v.numpy()
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "v1.pkl")
            with open(path, "wb") as f:
                pickle.dump({"model": sd, "__author__": "test"}, f)
            self.check_checkpoint(path)

    def test_wrong_architecture_is_an_error(self):
        other = build("MODEL.SEM_SEG_HEAD.CONVS_DIM", 64, "MODEL.SEM_SEG_HEAD.MASK_DIM", 64)
        with tempfile.TemporaryDirectory() as d:
            DetectionCheckpointer(other, save_dir=d).save("other")
            path = os.path.join(d, "other.pth")
            with self.assertRaisesRegex(ValueError, r"other\.pth does not fit .*pixel_decoder"):
                MaskFormerCheckpointer(build()).load(path)

    def test_other_class_count_reinitialises_classifier(self):
        other = build("MODEL.SEM_SEG_HEAD.NUM_CLASSES", 20)
        with tempfile.TemporaryDirectory() as d:
            DetectionCheckpointer(other, save_dir=d).save("other")
            model = build()
            MaskFormerCheckpointer(model).load(os.path.join(d, "other.pth"))
            torch.testing.assert_close(
                model.sem_seg_head.predictor.query_feat.weight,
                other.sem_seg_head.predictor.query_feat.weight,
            )


class TestErrors(unittest.TestCase):
    def test_unknown_pixel_decoder(self):
        with self.assertRaisesRegex(KeyError, "PIXEL_DECODER_NAME='Nope'.*MSDeformAttnPixelDecoder"):
            build("MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "Nope")

    def test_unknown_transformer_decoder(self):
        with self.assertRaisesRegex(KeyError, "TRANSFORMER_DECODER_NAME='Nope'.*MultiScaleMasked"):
            build("MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME", "Nope")

    def test_unknown_transformer_in_feature(self):
        with self.assertRaisesRegex(ValueError, "TRANSFORMER_IN_FEATURE='res9'"):
            build("MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE", "res9")

    def test_unknown_config_key(self):
        msg = "unknown config key MODEL.MASK_FORMER.NUM_QUERIES; did you mean MODEL.MASK_FORMER.NUM_OBJECT_QUERIES"
        with self.assertRaisesRegex(KeyError, msg):
            tiny_cfg("MODEL.MASK_FORMER.NUM_QUERIES", 1)

    def test_unknown_key_in_file(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "bad.yaml")
            with open(path, "w") as f:
                f.write("MODEL:\n  MASK_FORMER:\n    DEC_LAYER: 3\n")
            msg = (r"bad\.yaml: unknown config key MODEL\.MASK_FORMER\.DEC_LAYER; "
                   r"did you mean MODEL\.MASK_FORMER\.DEC_LAYERS")
            with self.assertRaisesRegex(KeyError, msg):
                get_maskformer_cfg(path)

    def test_no_output_enabled(self):
        with self.assertRaisesRegex(ValueError, "SEMANTIC_ON, INSTANCE_ON and PANOPTIC_ON"):
            build(
                "MODEL.MASK_FORMER.TEST.SEMANTIC_ON", False,
                "MODEL.MASK_FORMER.TEST.INSTANCE_ON", False,
                "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", False,
            )


if __name__ == "__main__":
    unittest.main()
