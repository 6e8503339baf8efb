"""Instance evaluation on panoptic datasets (class ids over things and stuff together)."""
import os
import tempfile
import unittest

from detectron2.data import MetadataCatalog
from detectron2.data.datasets import register_coco_panoptic
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES, _get_builtin_metadata

from mask2former_d2.evaluation import InstanceSegEvaluator
from tests.common import DATA

COCO = os.path.join(DATA, "coco")


@unittest.skipUnless(os.path.isdir(COCO), f"{COCO} is absent (real COCO sample from ../shared)")
class TestInstanceSegEvaluator(unittest.TestCase):
    def test_thing_names_when_metadata_lists_every_class(self):
        # Detectron2's "coco_panoptic_standard" metadata lists all 133 names in thing_classes;
        # COCO's per-category table needs the 80 thing names in id order.
        name = "test_eval_coco_sample_panoptic"
        if name not in MetadataCatalog.list():
            register_coco_panoptic(
                name, _get_builtin_metadata("coco_panoptic_standard"),
                os.path.join(COCO, "val2017"), os.path.join(COCO, "panoptic_val2017"),
                os.path.join(COCO, "annotations", "panoptic_val2017.json"),
                os.path.join(COCO, "annotations", "instances_val2017.json"),
            )
        self.assertEqual(len(MetadataCatalog.get(name).thing_classes), 133)
        with tempfile.TemporaryDirectory() as d:
            ev = InstanceSegEvaluator(name, output_dir=d)
        things = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]
        self.assertEqual(ev._metadata.thing_classes, things)
        self.assertEqual(sorted(ev._metadata.thing_dataset_id_to_contiguous_id.values()), list(range(80)))


if __name__ == "__main__":
    unittest.main()
