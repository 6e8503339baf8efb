"""validate_cfg (mask2former_d2.config): accepts every published config, and names the key, the
value and the expected values (with close names) of a wrong one."""
import glob
import os
import unittest

from mask2former_d2.config import get_maskformer_cfg, validate_cfg

from .common import ROOT, TINY_CONFIG


class TestValidateCfg(unittest.TestCase):
    def test_every_shipped_config_is_valid(self):
        files = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
        self.assertGreater(len(files), 50)
        for path in files:
            with self.subTest(config=os.path.relpath(path, ROOT)):
                validate_cfg(get_maskformer_cfg(path))

    def error(self, *opts) -> str:
        with self.assertRaises(ValueError) as ctx:
            validate_cfg(get_maskformer_cfg(TINY_CONFIG, list(opts)))
        return str(ctx.exception)

    def test_registered_names(self):
        cases = {
            "MODEL.META_ARCHITECTURE": ("MaskFormr", "MaskFormer"),
            "MODEL.BACKBONE.NAME": ("build_resnet_backbon", "build_resnet_backbone"),
            "MODEL.SEM_SEG_HEAD.NAME": ("MaskFormerHaed", "MaskFormerHead"),
            "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME": (
                "MultiScaleMaskedTransformerDecodr", "MultiScaleMaskedTransformerDecoder"
            ),
        }
        for key, (wrong, right) in cases.items():
            with self.subTest(key=key):
                message = self.error(key, wrong)
                self.assertTrue(message.startswith(f"{key}: unknown name {wrong!r}; did you mean {right}"), message)
                self.assertIn("(registered: ", message)

    def test_sizes_must_be_positive(self):
        for key in ("MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "MODEL.SEM_SEG_HEAD.NUM_CLASSES"):
            with self.subTest(key=key):
                self.assertEqual(self.error(key, 0), f"{key} must be a positive integer; got 0")

    def test_dataset_names(self):
        message = self.error("DATASETS.TRAIN", ("ade20k_panoptic_trian",))
        self.assertTrue(
            message.startswith("DATASETS.TRAIN: unknown dataset 'ade20k_panoptic_trian'; did you mean "
                               "ade20k_panoptic_train"),
            message,
        )
        validate_cfg(get_maskformer_cfg(TINY_CONFIG, ["DATASETS.TRAIN", ("x",)]), datasets=False)


if __name__ == "__main__":
    unittest.main()
