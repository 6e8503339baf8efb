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

import torch

from mask2former_d2 import engine
from mask2former_d2.engine import default_argument_parser, launch_main
from mask2former_d2.engine import launch as launch_module

from ..common import ROOT, TINY_CONFIG


def _never(args):
    raise AssertionError("main_fn must not run for a command-line mistake")


class _CommandLineCase(unittest.TestCase):
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


class TestBadCommandLine(_CommandLineCase):
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


class TestConfigMistakes(_CommandLineCase):
    """Each mistake of the issue's list: one line naming key, value and what is expected,
    before any worker is spawned (or, for the dataset-dependent check, any model built)."""

    def test_solver_values(self):
        cases = [
            (["SOLVER.IMS_PER_BATCH", "0"], "SOLVER.IMS_PER_BATCH must be a positive integer; got 0"),
            (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER must be a positive integer; got 0"),
            (["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD must be a positive integer; got 0"),
            (["--num-gpus", "3", "MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "4"],
             "SOLVER.IMS_PER_BATCH 4 is not divisible by the 3 processes (--num-gpus x --num-machines); "
             "use a multiple of 3"),
        ]
        for argv, expected in cases:
            with self.subTest(argv=argv):
                self.assertIn(expected, self.error_line(argv))

    def test_solver_values_do_not_matter_for_eval_only(self):
        seen = []
        with contextlib.redirect_stdout(io.StringIO()):
            launch_main(self.parse("--eval-only", "--allow-random-weights", "SOLVER.MAX_ITER", "0", *self.out),
                        lambda args: seen.append(args))
        self.assertEqual(len(seen), 1)

    def test_input_sizes_and_format(self):
        cases = [
            (["INPUT.IMAGE_SIZE", "0"], "INPUT.IMAGE_SIZE must be > 0; got 0"),
            (["INPUT.MIN_SIZE_TRAIN", "(0,)"], "INPUT.MIN_SIZE_TRAIN must be > 0; got (0,)"),
            (["INPUT.MIN_SIZE_TEST", "-1"], "INPUT.MIN_SIZE_TEST must be >= 0 (0: no resizing); got -1"),
            (["INPUT.FORMAT", "L"], "INPUT.FORMAT 'L' is not supported: the model takes 3-channel images, "
                                    "INPUT.FORMAT BGR or RGB"),
        ]
        for argv, expected in cases:
            with self.subTest(argv=argv):
                self.assertIn(expected, self.error_line(argv))

    def test_model_and_loader_values(self):
        cases = [
            (["MODEL.MASK_FORMER.NHEADS", "5"],
             "MODEL.MASK_FORMER.HIDDEN_DIM 64 is not divisible by MODEL.MASK_FORMER.NHEADS 5"),
            (["MODEL.MASK_FORMER.DEC_LAYERS", "0"], "MODEL.MASK_FORMER.DEC_LAYERS must be a positive integer; got 0"),
            (["DATALOADER.NUM_WORKERS", "-1"], "DATALOADER.NUM_WORKERS must be >= 0 (0: load in the main process)"),
            (["--num-gpus", "0"], "--num-gpus must be >= 1"),
        ]
        for argv, expected in cases:
            with self.subTest(argv=argv):
                self.assertIn(expected, self.error_line(argv))

    def test_data_loader_worker_error_is_one_line(self):
        # A DataLoader worker re-raises an error with its traceback in the message.
        def fail(args):
            raise FileNotFoundError(
                "Caught FileNotFoundError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                "last):\n  File \"mapper.py\", line 3, in __call__\nFileNotFoundError: [Errno 2] No such file or "
                "directory: '/data/gone.jpg'\n"
            )

        message = self.error_line(list(self.out), main_fn=fail)
        self.assertIn("error: FileNotFoundError: [Errno 2] No such file or directory: '/data/gone.jpg'", message)

    def test_cuda_index_without_cuda(self):
        with mock.patch("torch.cuda.is_available", return_value=False):
            message = self.error_line(["MODEL.DEVICE", "cuda:1"])
        self.assertIn("MODEL.DEVICE cuda:1: CUDA is not available on this machine; use MODEL.DEVICE cpu", message)
        self.assertIn("MODEL.DEVICE 'gpu' is not a device", self.error_line(["MODEL.DEVICE", "gpu"]))

    def test_fewer_classes_than_the_dataset(self):
        message = self.error_line(
            ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5", *self.out],
            main_fn=lambda args: engine.main(args, _NoTrainer),
        )
        self.assertIn(
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES 5 is smaller than the 133 classes of DATASETS.TRAIN "
            "'coco_2017_val_panoptic_with_sem_seg' (its metadata's stuff_classes); set "
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES 133", message,
        )

    def yaml_files(self, **files: str) -> str:
        folder = tempfile.mkdtemp(dir=self.tmp.name)
        for name, text in files.items():
            with open(os.path.join(folder, name + ".yaml"), "w") as f:
                f.write(text)
        return folder

    def test_circular_base(self):
        folder = self.yaml_files(a="_BASE_: b.yaml\n", b="_BASE_: a.yaml\n")
        config = os.path.join(folder, "a.yaml")
        args = default_argument_parser().parse_args(["--config-file", config])
        with self.assertRaises(SystemExit) as ctx, contextlib.redirect_stdout(io.StringIO()):
            launch_main(args, _never)
        self.assertIn("error: circular _BASE_ in config files: ", ctx.exception.code)
        self.assertIn("a.yaml -> ", ctx.exception.code)
        self.assertIn("b.yaml -> ", ctx.exception.code)
        self.assertEqual(len(ctx.exception.code.splitlines()), 1)

    def test_yaml_syntax_error(self):
        folder = self.yaml_files(bad=f"_BASE_: {TINY_CONFIG}\nSOLVER:\n  BASE_LR: [0.1\n")
        config = os.path.join(folder, "bad.yaml")
        args = default_argument_parser().parse_args(["--config-file", config])
        with self.assertRaises(SystemExit) as ctx, contextlib.redirect_stdout(io.StringIO()):
            launch_main(args, _never)
        self.assertIn(f"error: config file {config}: YAML syntax error at line 4, column 1", ctx.exception.code)

    def test_eval_only_without_weights(self):
        message = self.error_line(["--eval-only", *self.out])
        self.assertIn("--eval-only without MODEL.WEIGHTS would evaluate a randomly initialised model", message)
        self.assertIn("--allow-random-weights", message)

    def test_both_override_forms(self):
        seen = {}
        for argv in (["--opts", "SOLVER.MAX_ITER", "7", *self.out],
                     ["SOLVER.MAX_ITER", "7", "--opts", *self.out],
                     ["SOLVER.MAX_ITER", "7", *self.out]):
            with self.subTest(argv=argv), contextlib.redirect_stdout(io.StringIO()):
                launch_main(self.parse(*argv), lambda args: seen.update(opts=args.opts))
                self.assertEqual(seen["opts"], ["SOLVER.MAX_ITER", "7", *self.out])

    def test_infinite_loss_names_iteration_terms_and_lr(self):
        # Detectron2's own error for a non-finite loss, as its trainer raises it.
        from detectron2.engine import SimpleTrainer
        from detectron2.utils.events import EventStorage

        from mask2former_d2.engine.trainer import _non_finite_message

        with EventStorage(7), self.assertRaises(FloatingPointError) as ctx:
            SimpleTrainer.write_metrics({"loss_ce": torch.tensor(float("inf")), "loss_dice": torch.tensor(1.0)},
                                        0.01, cur_iter=7)
        self.assertEqual(
            _non_finite_message(ctx.exception, 1e6, 1e6),
            "the loss became infinite or NaN at iteration 7 (loss_ce=inf) with learning rate 1e+06 "
            "(SOLVER.BASE_LR 1e+06); lower SOLVER.BASE_LR, lengthen SOLVER.WARMUP_ITERS or enable "
            "SOLVER.CLIP_GRADIENTS",
        )


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
