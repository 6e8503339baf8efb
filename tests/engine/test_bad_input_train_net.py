"""A user's mistakes on the train_net.py command line: one line naming what is wrong and what is
expected, exit status 1, before any worker is spawned or model built (mask2former_d2.engine.launch).

Most cases run ``launch_main`` in-process with a ``main_fn`` that must not be reached; one runs
train_net.py in a subprocess to check the user sees no traceback."""
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import unittest
from typing import List
from unittest import mock

from mask2former_d2 import engine
from mask2former_d2.engine import default_argument_parser, launch_main
from mask2former_d2.engine import launch as launch_module

from ..common import ROOT, TINY_CONFIG


def _never(args):
    raise AssertionError("main_fn must not run for a command-line mistake")


class TestBadCommandLine(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.out = ["OUTPUT_DIR", cls.tmp.name]

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def parse(self, *argv: str):
        return default_argument_parser().parse_args(["--config-file", TINY_CONFIG, *argv])

    def error_line(self, argv: List[str], main_fn=_never) -> str:
        """The message train_net.py exits with (status 1) for ``argv``."""
        stderr = io.StringIO()
        with self.assertRaises(SystemExit) as ctx, contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(stderr):
            launch_main(self.parse(*argv), main_fn)
        message = ctx.exception.code
        self.assertIsInstance(message, str, "sys.exit(message): printed on stderr, status 1")
        self.assertEqual(len(message.splitlines()), 1, message)
        self.assertNotIn("Traceback", stderr.getvalue())
        return message

    def test_num_gpus_without_cuda(self):
        with mock.patch("torch.cuda.is_available", return_value=False):
            message = self.error_line(["--num-gpus", "2", "MODEL.DEVICE", "cuda"])
        self.assertIn("--num-gpus 2", message)
        self.assertIn("CUDA is not available", message)
        self.assertIn("MODEL.DEVICE cpu", message)

    def test_unknown_meta_architecture(self):
        message = self.error_line(["MODEL.META_ARCHITECTURE", "MaskFormr"])
        self.assertIn(
            "MODEL.META_ARCHITECTURE: unknown name 'MaskFormr'; did you mean MaskFormer, VideoMaskFormer?", message
        )
        self.assertIn("registered: ", message)  # the valid names are listed

    def test_unknown_pixel_decoder(self):
        message = self.error_line(["MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "MSDeformAttnPixelDecodr"])
        self.assertIn("did you mean MSDeformAttnPixelDecoder", message)

    def test_non_positive_number_of_queries(self):
        for value in ("0", "-5"):
            with self.subTest(value=value):
                message = self.error_line(["MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", value])
                self.assertIn(f"MODEL.MASK_FORMER.NUM_OBJECT_QUERIES must be a positive integer; got {value}",
                              message)

    def test_misspelt_dataset_suggests_close_names(self):
        # Checked by setup() (in each worker: datasets may be registered by main_fn).
        message = self.error_line(
            ["DATASETS.TEST", "('coco_2017_val_panoptc',)", *self.out],
            main_fn=lambda args: engine.main(args, _NoTrainer),
        )
        self.assertIn(
            "DATASETS.TEST: unknown dataset 'coco_2017_val_panoptc'; did you mean coco_2017_val_panoptic", message
        )
        self.assertLess(len(message), 400)  # not the list of every registered dataset

    def test_missing_weights(self):
        path = os.path.join(self.tmp.name, "missing.pkl")
        message = self.error_line(["MODEL.WEIGHTS", path])
        self.assertIn(f"MODEL.WEIGHTS {path}: no such file", message)

    def test_unknown_config_key_still_suggests(self):
        message = self.error_line(["SOLVER.BASE_LRR", "0.1"])
        self.assertIn("unknown config key SOLVER.BASE_LRR; did you mean SOLVER.BASE_LR", message)

    def test_option_after_the_overrides(self):
        message = self.error_line(["SOLVER.MAX_ITER", "1", "--num-gpus", "2"])
        self.assertIn("--num-gpus is written after the KEY VALUE config overrides", message)
        self.assertIn("put it before them", message)

    def test_switches_after_the_overrides_are_taken(self):
        seen = {}

        def record(args):
            seen.update(vars(args))

        with contextlib.redirect_stdout(io.StringIO()) as out:
            launch_main(self.parse("SOLVER.MAX_ITER", "1", *self.out, "--resume", "--eval-only",
                                   "--allow-random-weights"), record)
        self.assertTrue(seen["resume"])
        self.assertTrue(seen["eval_only"])
        self.assertEqual(seen["opts"], ["SOLVER.MAX_ITER", "1", *self.out])
        self.assertIn("--resume --eval-only --allow-random-weights taken as an option", out.getvalue())

    def test_debug_shows_the_exception(self):
        with self.assertRaisesRegex(ValueError, "NUM_OBJECT_QUERIES"), contextlib.redirect_stdout(io.StringIO()):
            launch_main(self.parse("--debug", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "0"), _never)

    def test_worker_reports_once_and_exits_with_the_user_error_status(self):
        # In a spawned worker (world size > 1) the parent only sees a traceback text: the worker
        # prints the line and exits with a status the parent recognises.
        def fail(args):
            raise ValueError("DATASETS.TEST: unknown dataset 'x'")

        stderr = io.StringIO()
        with mock.patch.object(launch_module.comm, "get_world_size", return_value=2), \
                mock.patch.object(launch_module.comm, "get_rank", return_value=0), \
                contextlib.redirect_stderr(stderr), self.assertRaises(SystemExit) as ctx:
            launch_module._main_then_shutdown(fail, self.parse())
        self.assertEqual(ctx.exception.code, launch_module._USER_ERROR_EXIT)
        self.assertIn("error: DATASETS.TEST: unknown dataset 'x'", stderr.getvalue())


class _NoTrainer:
    def __init__(self, cfg):
        raise AssertionError("the trainer must not be built")


class TestTrainNetSubprocess(unittest.TestCase):
    def test_one_line_without_traceback(self):
        proc = subprocess.run(
            [sys.executable, "train_net.py", "--config-file", TINY_CONFIG, "MODEL.META_ARCHITECTURE", "Nope"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        self.assertEqual(proc.returncode, 1, proc.stderr[-2000:])
        self.assertNotIn("Traceback", proc.stderr)
        self.assertIn("train_net.py: error: MODEL.META_ARCHITECTURE: unknown name 'Nope'", proc.stderr)
        self.assertNotIn("Command Line Args", proc.stdout)  # stopped before launching


if __name__ == "__main__":
    unittest.main()
