"""Bad training data gives one line naming the file, the record and the field, before training
starts (mask2former_d2.engine.trainer.load_train_dicts and the COCO json check of
mask2former_d2.data.datasets.utils): a json without images, an annotation without
category_id, an empty training set, an image listed but missing. Datasets are registered with
Detectron2's own ``register_coco_instances``, as a user registers theirs."""
import contextlib
import io
import json
import os
import tempfile
import unittest

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from mask2former_d2 import engine
from mask2former_d2.engine import Trainer, default_argument_parser, launch_main
from mask2former_d2.engine.trainer import load_train_dicts

from ..common import TINY_CONFIG


def _coco(images=True, category_id=True, files=("a.jpg",)):
    content = {
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": 10 + i, "image_id": i + 1, "bbox": [2, 2, 8, 8], "area": 64, "iscrowd": 0,
             "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]], **({"category_id": 1} if category_id else {})}
            for i in range(len(files))
        ],
    }
    if images:
        content["images"] = [{"id": i + 1, "file_name": f, "height": 20, "width": 30} for i, f in enumerate(files)]
    return content


class TestBadData(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.root = cls.tmp.name
        cv2.imwrite(os.path.join(cls.root, "a.jpg"), np.zeros((20, 30, 3), np.uint8))
        cls.names = []

    @classmethod
    def tearDownClass(cls):
        for name in cls.names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        cls.tmp.cleanup()

    def register(self, name: str, content) -> str:
        path = os.path.join(self.root, name + ".json")
        with open(path, "w") as f:
            json.dump(content, f)
        register_coco_instances(name, {}, path, self.root)
        self.names.append(name)
        return path

    def error(self, name: str, error=ValueError) -> str:
        with self.assertRaises(error) as ctx, contextlib.redirect_stdout(io.StringIO()):
            load_train_dicts([name], filter_empty=True)
        message = str(ctx.exception)
        self.assertEqual(len(message.splitlines()), 1, message)
        return message

    def test_json_without_images(self):
        path = self.register("bad_no_images", _coco(images=False))
        self.assertEqual(
            self.error("bad_no_images"),
            f"{path}: the 'images' list is missing; a COCO json lists its images there",
        )

    def test_annotation_without_category_id(self):
        path = self.register("bad_no_category", _coco(category_id=False))
        self.assertEqual(self.error("bad_no_category"), f"{path}: annotations[0] (id 10) has no 'category_id'")

    def test_empty_training_set(self):
        path = self.register("bad_empty", {"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]})
        message = self.error("bad_empty")
        self.assertIn(f"dataset 'bad_empty' has no images (json_file {path}; image_root {self.root})", message)

    def test_image_listed_but_missing(self):
        self.register("bad_missing_image", _coco(files=("a.jpg", "gone.jpg")))
        message = self.error("bad_missing_image", FileNotFoundError)
        self.assertEqual(
            message,
            f"bad_missing_image: record 1 (id 2) lists file_name {os.path.join(self.root, 'gone.jpg')}, which "
            "does not exist; fix the dataset's paths or remove the record",
        )

    def test_empty_test_set(self):
        from tests.common import tiny_cfg

        empty = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}
        path = self.register("bad_empty_test", empty)
        with self.assertRaises(ValueError) as ctx:
            Trainer.build_test_loader(tiny_cfg(), "bad_empty_test")
        self.assertIn(f"dataset 'bad_empty_test' has no images (json_file {path}", str(ctx.exception))

    def test_train_net_reports_the_line_without_a_traceback(self):
        # Through train_net.py's launch_main and the real Trainer: the model is built, then the
        # loader stops before the first iteration.
        path = self.register("bad_train_net", _coco(category_id=False))
        out_dir = os.path.join(self.root, "out")
        args = default_argument_parser().parse_args([
            "--config-file", TINY_CONFIG, "MODEL.DEVICE", "cpu", "DATASETS.TRAIN", "('bad_train_net',)",
            "DATASETS.TEST", "()", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "1", "OUTPUT_DIR", out_dir,
            "INPUT.DATASET_MAPPER_NAME", "mask_former_instance",
        ])
        stderr = io.StringIO()
        with self.assertRaises(SystemExit) as ctx, contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(stderr):
            launch_main(args, lambda a: engine.main(a, Trainer))
        self.assertEqual(ctx.exception.code,
                         f"__main__.py: error: {path}: annotations[0] (id 10) has no 'category_id' "
                         "(--debug shows the traceback)".replace("__main__.py", ctx.exception.code.split(":")[0]))
        self.assertNotIn("Traceback", stderr.getvalue())


if __name__ == "__main__":
    unittest.main()
