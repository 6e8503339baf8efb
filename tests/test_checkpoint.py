"""A wrong MODEL.WEIGHTS file gives one line naming the file and what is wrong with it
(mask2former_d2.checkpoint): missing, a folder, empty, text, truncated, damaged, a classification
checkpoint that needs converting, or weights of something else entirely."""
import os
import pickle
import tempfile
import unittest

import torch
from torch import nn

from mask2former_d2.checkpoint import MaskFormerCheckpointer, classification_checkpoint


def _torchvision_resnet_state_dict():
    """The names (and a few shapes) of a torchvision ResNet-18 state dict, with tiny tensors."""
    sd = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64), "fc.weight": torch.zeros(10, 512)}
    for i in range(1, 5):
        sd[f"layer{i}.0.conv1.weight"] = torch.zeros(1)
        sd[f"layer{i}.0.bn1.running_mean"] = torch.zeros(1)
    sd["fc.bias"] = torch.zeros(10)
    return sd


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Conv2d(3, 4, 1)


class TestBadWeightFiles(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.dir = cls.tmp.name

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def path(self, name: str, content: bytes = None) -> str:
        path = os.path.join(self.dir, name)
        if content is not None:
            with open(path, "wb") as f:
                f.write(content)
        return path

    def load_error(self, path: str, error=ValueError) -> str:
        with self.assertRaises(error) as ctx:
            MaskFormerCheckpointer(_Tiny()).load(path)
        message = str(ctx.exception)
        self.assertEqual(len(message.splitlines()), 1, message)
        return message

    def test_missing_file_and_folder(self):
        missing = self.path("missing.pth")
        self.assertEqual(
            self.load_error(missing, FileNotFoundError),
            f"checkpoint {missing}: no such file; expected a .pkl or .pth weight file",
        )
        self.assertIn(f"checkpoint {self.dir}: is a directory", self.load_error(self.dir, FileNotFoundError))

    def test_truncated_torch_save_archive(self):
        full = self.path("full.pth")
        torch.save({"model": _Tiny().state_dict()}, full)
        with open(full, "rb") as f:
            data = f.read()
        cut = self.path("cut.pth", data[: len(data) // 2])
        message = self.load_error(cut)
        self.assertIn(f"cannot read checkpoint {cut}: the torch.save archive is truncated or damaged", message)

    def test_truncated_pickle(self):
        data = pickle.dumps({"model": {k: v.numpy() for k, v in _Tiny().state_dict().items()}, "__author__": "x"})
        cut = self.path("cut.pkl", data[: len(data) // 2])
        self.assertIn(f"cannot read checkpoint {cut}: the file is truncated (pickle data was truncated)",
                      self.load_error(cut))

    def test_text_and_empty_files(self):
        # "hello world" as a .pth made torch's unpickler raise a bare KeyError: 101.
        for name in ("notes.pth", "notes.pkl", "notes.txt"):
            with self.subTest(name=name):
                text = self.path(name, b"hello world\n")
                self.assertIn(
                    f"cannot read checkpoint {text}: it is a text file, not a weight file (it starts with 'hello world",
                    self.load_error(text),
                )
        empty = self.path("empty.pth", b"")
        self.assertIn(f"cannot read checkpoint {empty}: the file is empty", self.load_error(empty))

    def test_torchvision_classification_checkpoint(self):
        for name in ("resnet18.pth", "resnet18.pkl"):
            with self.subTest(name=name):
                path = self.path(name)
                if name.endswith(".pth"):
                    torch.save(_torchvision_resnet_state_dict(), path)
                else:  # a pickled dict is read by Detectron2 as Caffe2 weights (name matching)
                    with open(path, "wb") as f:
                        pickle.dump({k: v.numpy() for k, v in _torchvision_resnet_state_dict().items()}, f)
                message = self.load_error(path)
                self.assertIn(f"{path} is a torchvision ImageNet classification checkpoint", message)
                self.assertIn(f"python tools/convert_torchvision_to_d2.py {path} resnet18_d2.pkl", message)
                self.assertIn("MODEL.WEIGHTS resnet18_d2.pkl", message)

    def test_classification_checkpoint_recognises_only_classifiers(self):
        self.assertIsNone(classification_checkpoint(_Tiny().state_dict()))
        self.assertIsNone(classification_checkpoint(["backbone.res2.0.conv1.weight", "sem_seg_head.x"]))
        swin = ["patch_embed.proj.weight", "layers.0.blocks.0.attn.qkv.weight", "head.weight"]
        self.assertIn("tools/convert_swin_to_d2.py", classification_checkpoint(swin, "swin_tiny.pth"))

    def test_no_key_of_the_model(self):
        path = self.path("other.pth")
        torch.save({"model": {"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)}}, path)
        message = self.load_error(path)
        self.assertIn(f"{path}: none of its 2 keys is a key of this model", message)
        self.assertIn("backbone.weight", message)

    def test_good_file_still_loads(self):
        source, target = _Tiny(), _Tiny()
        path = self.path("good.pth")
        torch.save({"model": source.state_dict()}, path)
        MaskFormerCheckpointer(target).load(path)
        self.assertTrue(torch.equal(source.backbone.weight, target.backbone.weight))


class TestWeightsThatDoNotFit(unittest.TestCase):
    """Inference (Predictor, and so the demos, export and --eval-only's checkpointer) refuses
    weights whose head does not fit the config; fine-tuning keeps Detectron2's re-initialisation
    with a warning."""

    @classmethod
    def setUpClass(cls):
        from detectron2.modeling import build_model

        from tests.common import ROOT, tiny_cfg

        cls.tmp = tempfile.TemporaryDirectory()
        cls.tiny_cfg = staticmethod(tiny_cfg)
        # An image model trained for 3 classes, a video model shaped exactly like the image
        # model (same keys and shapes: only the recorded architecture tells them apart), and a
        # backbone-only file.
        cls.three = cls.save(build_model(tiny_cfg("MODEL.SEM_SEG_HEAD.NUM_CLASSES", 3)), "three")
        video_cfg = tiny_cfg(config_file=os.path.join(ROOT, "configs", "quickstart",
                                                      "video_maskformer2_R18_tiny_toy_ytvis.yaml"))
        video_cfg.merge_from_list(["MODEL.SEM_SEG_HEAD.NUM_CLASSES", 133, "DATASETS.TEST", ()])
        cls.video = cls.save(build_model(video_cfg), "video")
        model = build_model(tiny_cfg())
        cls.backbone = os.path.join(cls.tmp.name, "backbone.pth")
        torch.save({"model": {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}},
                   cls.backbone)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @classmethod
    def save(cls, model, name: str) -> str:
        folder = os.path.join(cls.tmp.name, name)
        os.makedirs(folder)
        MaskFormerCheckpointer(model, folder).save("model")
        return os.path.join(folder, "model.pth")

    def predictor_error(self, weights: str) -> str:
        from mask2former_d2.predictor import Predictor

        with self.assertRaises(ValueError) as ctx:
            Predictor(self.tiny_cfg("MODEL.WEIGHTS", weights))
        message = str(ctx.exception)
        self.assertEqual(len(message.splitlines()), 1, message)
        return message

    def test_other_class_count(self):
        message = self.predictor_error(self.three)
        self.assertIn(f"{self.three} was trained for 3 classes, but the config expects "
                      "MODEL.SEM_SEG_HEAD.NUM_CLASSES 133", message)
        self.assertIn("sem_seg_head.predictor.class_embed.weight: (4, 32) in the checkpoint, (134, 32) in the model",
                      message)

    def test_video_checkpoint_in_the_image_model(self):
        message = self.predictor_error(self.video)
        self.assertIn(f"{self.video} is a VideoMaskFormer checkpoint, but the config builds a MaskFormer "
                      "(MODEL.META_ARCHITECTURE)", message)

    def test_backbone_only_weights(self):
        message = self.predictor_error(self.backbone)
        self.assertRegex(message, rf"{self.backbone} lacks \d+ of the model's \d+ parameters \(sem_seg_head\.")

    def test_fine_tuning_keeps_the_warning(self):
        from detectron2.modeling import build_model

        model = build_model(self.tiny_cfg())
        with self.assertLogs("mask2former_d2.checkpoint", "WARNING") as logs:
            MaskFormerCheckpointer(model).load(self.three)
        self.assertIn("class-dependent weights re-initialised for a different number of classes", logs.output[0])
        MaskFormerCheckpointer(model).load(self.video)  # the COCO -> YouTube-VIS recipe, reversed


if __name__ == "__main__":
    unittest.main()
