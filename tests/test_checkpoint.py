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


if __name__ == "__main__":
    unittest.main()
