"""End-to-end tests of train_net.py, run as users run it: in subprocesses.

* two CPU processes (gloo): train a few iterations, checkpoint, evaluate on the toy panoptic val
  split with results gathered from both workers, exit cleanly; then ``--eval-only`` of the final
  weights with the same two processes gives the same metrics;
* a run killed with SIGKILL (by a hook, right after its checkpoint of iteration 21: the same
  point on any machine) resumes with ``--resume`` at the iteration after that checkpoint,
  keeping the earlier checkpoints and metrics and taking over the dead run's ``OUTPUT_DIR``
  lock; a truncated last checkpoint falls back to the previous one;
* the checkpointer's fallback and atomic saving, on a toy module (fast).

The subprocess tests are slow (about 3 minutes on 2 cores) but meant for CI. Each subprocess has
a timeout, and the tail of its output is printed when a check fails.
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import unittest
from typing import Dict, List, Optional, Tuple
from unittest import mock

import torch
from torch import nn

from mask2former_d2.checkpoint import MaskFormerCheckpointer, last_good_checkpoint
from tests.common import ROOT as REPO_ROOT

TINY_CONFIG = "configs/quickstart/maskformer2_R18_tiny_coco_panoptic.yaml"
TOY_OPTS = [
    "MODEL.DEVICE", "cpu",
    "DATASETS.TRAIN", "('toy_panoptic_train',)",
    "DATASETS.TEST", "('toy_panoptic_val',)",
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5",
    "INPUT.IMAGE_SIZE", "160",
    "INPUT.MIN_SCALE", "0.6",
    "INPUT.MAX_SCALE", "1.6",
    "INPUT.MIN_SIZE_TEST", "160",
    "INPUT.MAX_SIZE_TEST", "256",
    "TEST.DETECTIONS_PER_IMAGE", "20",
    "SOLVER.IMS_PER_BATCH", "4",
]
NO_EVAL = ["DATASETS.TEST", "()"]  # the resume tests only train
TIMEOUT = 300  # seconds, for any one subprocess
# Signs of a worker dying at shutdown rather than returning.
ABORT_MARKERS = ("terminate called", "SIGABRT", "Aborted", "core dumped", "ProcessExitedException")


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


class _TrainNetCase(unittest.TestCase):
    """Runs train_net.py with DETECTRON2_DATASETS pointing at a temporary directory."""

    # OMP_NUM_THREADS for the subprocesses (None: inherited). On a shared machine a process with
    # a thread per core next to other busy processes trains several times slower.
    THREADS: Optional[str] = None

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="m2f_train_net_")
        cls.env = dict(os.environ, DETECTRON2_DATASETS=cls.tmp, PYTHONUNBUFFERED="1")
        if cls.THREADS is not None:
            cls.env.setdefault("OMP_NUM_THREADS", cls.THREADS)
        # Generated once here: two workers would otherwise both write it on first load.
        from mask2former_d2.data.toy import make_toy_panoptic_dataset

        make_toy_panoptic_dataset(os.path.join(cls.tmp, "toy_panoptic"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def start(self, args: List[str], log_name: str, script: str = "train_net.py") -> Tuple[subprocess.Popen, str]:
        """Starts ``script args`` (train_net.py by default) in its own process group; output goes
        to a log file."""
        log_path = os.path.join(self.tmp, log_name)
        cmd = [sys.executable, script, "--config-file", TINY_CONFIG] + args
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return proc, log_path

    def finish(self, proc: subprocess.Popen, log_path: str) -> Tuple[int, str]:
        """Waits for ``proc`` (killing its whole group on timeout); returns (exit code, output)."""
        try:
            code = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self.fail(f"train_net.py timed out after {TIMEOUT} s:\n{_tail(self.read(log_path))}")
        return code, self.read(log_path)

    def run_train_net(self, args: List[str], log_name: str) -> str:
        """Runs train_net.py to the end; asserts a clean exit; returns its output."""
        code, out = self.finish(*self.start(args, log_name))
        self.assertEqual(code, 0, f"exit code {code}:\n{_tail(out)}")
        for marker in ABORT_MARKERS:
            self.assertNotIn(marker, out, _tail(out))
        return out

    @staticmethod
    def read(path: str) -> str:
        with open(path) as f:
            return f.read()


def _printed_metrics(output: str) -> Dict[str, Dict[str, float]]:
    """The ``copypaste`` block Detectron2 prints after an evaluation: {task: {metric: value}}."""
    marker = "copypaste: "
    rows = [line.split(marker, 1)[1] for line in output.splitlines() if marker in line]
    metrics = {}
    for i, row in enumerate(rows):
        if row.startswith("Task: "):
            names, values = rows[i + 1].split(","), rows[i + 2].split(",")
            metrics[row[len("Task: "):]] = {n: float(v) for n, v in zip(names, values)}
    return metrics


def _iteration(path: str) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["iteration"]


class TestDistributedCPU(_TrainNetCase):
    # No OMP_NUM_THREADS: train_net.py shares the cores between its two processes itself.

    def check_metrics(self, output: str) -> Dict[str, Dict[str, float]]:
        metrics = _printed_metrics(output)
        for task, name in (("panoptic_seg", "PQ"), ("segm", "AP"), ("sem_seg", "mIoU")):
            printed = metrics.get(task, {})
            self.assertIn(name, printed, f"{task}/{name} not printed:\n{_tail(output)}")
            self.assertTrue(0 <= metrics[task][name] <= 100, metrics[task])
        return metrics

    def test_two_processes_train_evaluate_and_eval_only(self):
        out_dir = os.path.join(self.tmp, "dist")
        # An automatic port: Detectron2's default is fixed per user, so concurrent runs collide.
        launch = ["--num-gpus", "2", "--dist-url", "auto"]
        schedule = ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"]
        # Seeded: an unseeded 4-iteration model was seen (once in many runs) to predict no thing
        # instance on any val image, and COCO evaluation then prints no segm/AP.
        out = self.run_train_net(
            launch + TOY_OPTS + schedule + ["SEED", "3", "OUTPUT_DIR", out_dir], "dist_train.log"
        )
        self.assertIn("World size: 2", out)
        self.assertTrue(os.path.isfile(os.path.join(out_dir, "log.txt.rank1")), "no second worker")
        for name in ("model_0000001.pth", "model_0000003.pth", "model_final.pth"):
            self.assertTrue(os.path.isfile(os.path.join(out_dir, name)), name)
        self.assertEqual(self.read(os.path.join(out_dir, "last_checkpoint")), "model_final.pth")
        self.assertEqual(_iteration(os.path.join(out_dir, "model_final.pth")), 3)
        train_metrics = self.check_metrics(out)

        # 8 val images, 4 per worker: the main worker's results cover all of them. The
        # evaluator's saved predictions hold every image, also those where an untrained model
        # finds no thing instance (coco_instances_results.json lists only the detections).
        self.assertIn("Start inference on 4 batches", out)
        inference = os.path.join(out_dir, "inference")
        saved = torch.load(os.path.join(inference, "instances_predictions.pth"), weights_only=False)
        self.assertEqual(sorted(p["image_id"] for p in saved), list(range(1, 9)))
        with open(os.path.join(inference, "coco_instances_results.json")) as f:
            detected = {r["image_id"] for r in json.load(f)}
        self.assertEqual(detected, {p["image_id"] for p in saved if p["instances"]})
        with open(os.path.join(inference, "sem_seg_predictions.json")) as f:
            self.assertEqual(len({r["file_name"] for r in json.load(f)}), 8)
        with open(os.path.join(out_dir, "metrics.json")) as f:
            logged = json.loads(f.read().splitlines()[-1])
        self.assertAlmostEqual(logged["panoptic_seg/PQ"], train_metrics["panoptic_seg"]["PQ"], 3)

        eval_dir = os.path.join(self.tmp, "dist_eval")
        weights = ["MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth")]
        out = self.run_train_net(
            launch + ["--eval-only"] + TOY_OPTS + weights + ["OUTPUT_DIR", eval_dir],
            "dist_eval.log",
        )
        eval_metrics = self.check_metrics(out)
        # Same weights, same data split over the workers: the same numbers.
        for task in ("panoptic_seg", "segm", "sem_seg"):
            for name, value in train_metrics[task].items():
                if value == value:  # NaN for empty size ranges
                    self.assertAlmostEqual(eval_metrics[task][name], value, 2, (task, name))


# train_net.py with one more hook, run after the periodic checkpointer and the metrics writer:
# after iteration M2F_KILL_AT it sends its own process M2F_SIGNAL: KILL (a crash: no clean-up
# runs) or INT (Ctrl-C).
KILLED_TRAIN_NET = """
import os, signal, sys
from detectron2.engine import HookBase
from mask2former_d2.engine import Trainer, default_argument_parser, launch_main, main

class KillAfter(HookBase):
    def after_step(self):
        if self.trainer.iter == int(os.environ["M2F_KILL_AT"]):
            os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("M2F_SIGNAL", "KILL")))

class KilledTrainer(Trainer):
    def build_hooks(self):
        return super().build_hooks() + [KillAfter()]

# A Ctrl-C from a terminal: Python ignores SIGINT when started with it ignored (a job run in the
# background by a non-interactive shell, as CI may run the tests), so restore its handler here.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv[0] = "train_net.py"
launch_main(default_argument_parser().parse_args(), lambda args: main(args, KilledTrainer))
"""


class TestResume(_TrainNetCase):
    THREADS = "1"
    MAX_ITER, PERIOD = 30, 11  # checkpoints after iterations 10 and 21; metrics written at 19
    KILL_AT = 21

    def test_killed_run_resumes_and_survives_a_truncated_checkpoint(self):
        out_dir = os.path.join(self.tmp, "resume")
        period = ["SOLVER.CHECKPOINT_PERIOD", str(self.PERIOD)]
        args = TOY_OPTS + NO_EVAL + period + ["OUTPUT_DIR", out_dir]
        script = os.path.join(self.tmp, "killed_train_net.py")
        with open(script, "w") as f:
            f.write(KILLED_TRAIN_NET)
        self.env["M2F_KILL_AT"] = str(self.KILL_AT)
        try:
            proc, log_path = self.start(args + ["SOLVER.MAX_ITER", str(self.MAX_ITER)], "killed.log", script)
            code, out = self.finish(proc, log_path)
        finally:
            del self.env["M2F_KILL_AT"]
        self.assertEqual(code, -signal.SIGKILL, _tail(out))
        lock = json.loads(self.read(os.path.join(out_dir, ".lock")))  # left behind by the crash
        self.assertEqual(lock["pid"], proc.pid)

        last = os.path.join(out_dir, self.read(os.path.join(out_dir, "last_checkpoint")).strip())
        done = _iteration(last)
        self.assertEqual(done, self.KILL_AT)
        self.assertFalse(os.path.exists(os.path.join(out_dir, "model_final.pth")))
        # A copy of the killed run for the truncated-checkpoint case below.
        broken_dir = os.path.join(self.tmp, "resume_truncated")
        shutil.copytree(out_dir, broken_dir)

        # Without --resume the folder is refused (after taking over the dead run's lock), and no
        # file of the earlier run changes.
        def files():
            return {n: os.path.getmtime(os.path.join(out_dir, n)) for n in os.listdir(out_dir) if n != ".lock"}

        before = files()
        code, out = self.finish(*self.start(args + ["SOLVER.MAX_ITER", str(self.MAX_ITER)], "refused.log"))
        self.assertEqual(code, 1, _tail(out))
        self.assertIn(f"taking over the lock of process {proc.pid} on ", out)
        self.assertIn(f"OUTPUT_DIR {out_dir} already holds a run (last_checkpoint, model_0000010.pth, "
                      "model_0000021.pth, metrics.json); add --resume to continue it, --start-over", out)
        self.assertNotIn("Traceback", out)
        self.assertEqual(files(), before)

        out = self.run_train_net(
            ["--resume"] + args + ["SOLVER.MAX_ITER", str(self.MAX_ITER)], "resumed.log"
        )
        self.assertIn(f"Starting training from iteration {done + 1}", out, _tail(out))
        self.assertFalse(os.path.exists(os.path.join(out_dir, ".lock")))  # released at the end
        self.assertEqual(_iteration(os.path.join(out_dir, "model_final.pth")), self.MAX_ITER - 1)
        for name, it in (("model_0000010.pth", 10), ("model_0000021.pth", 21)):
            self.assertEqual(_iteration(os.path.join(out_dir, name)), it)
        with open(os.path.join(out_dir, "metrics.json")) as f:
            logged = [json.loads(line)["iteration"] for line in f if line.strip()]
        # The killed run's line (iteration 19) is kept; the resumed run appends its own.
        self.assertEqual(logged, [19, self.MAX_ITER - 1])

        # A crash while saving: the newest checkpoint is truncated and last_checkpoint names it.
        good = os.path.join(broken_dir, "model_0000021.pth")
        with open(good, "rb") as f:
            data = f.read()
        bad = os.path.join(broken_dir, "model_0000024.pth")
        with open(bad, "wb") as f:
            f.write(data[: len(data) // 2])
        with open(os.path.join(broken_dir, "last_checkpoint"), "w") as f:
            f.write("model_0000024.pth")
        out = self.run_train_net(
            ["--resume"] + TOY_OPTS + NO_EVAL + ["SOLVER.MAX_ITER", "23", "OUTPUT_DIR", broken_dir],
            "truncated.log",
        )
        self.assertIn(f"Cannot read the last checkpoint {bad}", out, _tail(out))
        self.assertIn("resuming from " + good, out)
        self.assertIn("Starting training from iteration 22", out)
        self.assertEqual(_iteration(os.path.join(broken_dir, "model_final.pth")), 22)

    def test_infinite_loss_is_one_line(self):
        # Detectron2 logs its own traceback first: it stays in log.txt, the console shows ours.
        out_dir = os.path.join(self.tmp, "diverged")
        args = TOY_OPTS + NO_EVAL + ["SOLVER.BASE_LR", "1e30", "SOLVER.WARMUP_ITERS", "0", "SOLVER.MAX_ITER", "6",
                                     "SOLVER.CLIP_GRADIENTS.ENABLED", "False", "OUTPUT_DIR", out_dir]
        code, out = self.finish(*self.start(args, "diverged.log"))
        self.assertEqual(code, 1, _tail(out))
        last = out.strip().splitlines()[-1]
        self.assertRegex(last, r"^train_net.py: error: the loss became infinite or NaN at iteration \d+ \(loss_ce=")
        self.assertIn("with learning rate 1e+30 (SOLVER.BASE_LR 1e+30); lower SOLVER.BASE_LR", last)
        self.assertNotIn("Traceback", out)
        self.assertIn("FloatingPointError", self.read(os.path.join(out_dir, "log.txt")))

    def test_ctrl_c_names_the_last_good_checkpoint(self):
        out_dir = os.path.join(self.tmp, "interrupted")
        script = os.path.join(self.tmp, "interrupted_train_net.py")
        with open(script, "w") as f:
            f.write(KILLED_TRAIN_NET)
        args = TOY_OPTS + NO_EVAL + ["SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.MAX_ITER", "30", "OUTPUT_DIR", out_dir]
        self.env.update(M2F_KILL_AT="3", M2F_SIGNAL="INT")  # checkpoint after iteration 2
        try:
            code, out = self.finish(*self.start(args, "interrupted.log", script))
        finally:
            del self.env["M2F_KILL_AT"], self.env["M2F_SIGNAL"]
        self.assertEqual(code, 130, _tail(out))
        last = os.path.join(out_dir, "model_0000002.pth")
        self.assertEqual(
            out.strip().splitlines()[-1],
            f"train_net.py: interrupted; the last good checkpoint is {last} (continue with --resume)",
        )
        self.assertNotIn("Traceback", out)
        self.assertEqual(_iteration(last), 2)
        self.assertFalse(os.path.exists(os.path.join(out_dir, ".lock")))


class TestCheckpointFallback(unittest.TestCase):
    """MaskFormerCheckpointer.get_checkpoint_file on a toy module: no subprocess, fast."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="m2f_ckpt_")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.model = nn.Linear(3, 2)
        self.checkpointer = MaskFormerCheckpointer(self.model, self.dir)
        self.weights = {}
        for i, it in enumerate((4, 9)):
            with torch.no_grad():
                self.model.weight.fill_(float(it))
            self.checkpointer.save(f"model_{it:07d}", iteration=it)
            path = os.path.join(self.dir, f"model_{it:07d}.pth")
            os.utime(path, (1000 + i, 1000 + i))  # distinct modification times
            self.weights[it] = path

    def truncate(self, path: str):
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 3])

    def resume(self) -> Dict:
        with torch.no_grad():
            self.model.weight.zero_()
        return self.checkpointer.resume_or_load("", resume=True)

    def test_readable_last_checkpoint_is_used(self):
        self.assertEqual(self.checkpointer.get_checkpoint_file(), self.weights[9])
        self.assertEqual(self.resume()["iteration"], 9)
        self.assertTrue(torch.all(self.model.weight == 9))

    def test_truncated_last_checkpoint_falls_back_to_the_previous(self):
        self.truncate(self.weights[9])
        with self.assertLogs("mask2former_d2.checkpoint", logging.WARNING) as logs:
            extra = self.resume()
        self.assertIn(self.weights[9], logs.output[0])
        self.assertEqual(extra["iteration"], 4)
        self.assertTrue(torch.all(self.model.weight == 4))

    def test_empty_last_checkpoint_falls_back_to_the_newest(self):
        open(os.path.join(self.dir, "last_checkpoint"), "w").close()
        with self.assertLogs("mask2former_d2.checkpoint", logging.WARNING):
            self.assertEqual(self.resume()["iteration"], 9)

    def test_nothing_readable_raises(self):
        for path in self.weights.values():
            self.truncate(path)
        with self.assertRaises(ValueError) as ctx:
            self.resume()
        message = str(ctx.exception)
        self.assertEqual(len(message.splitlines()), 1, message)
        self.assertIn(f"cannot resume: the last checkpoint {self.weights[9]} is unreadable", message)
        self.assertIn(f"no other checkpoint in {self.dir} can be read", message)

    def test_interrupted_save_keeps_the_previous_files(self):
        # Ctrl-C (or a crash) while torch.save writes: nothing appears under the checkpoint's
        # name, no partial file is left, last_checkpoint still names the previous checkpoint.
        def interrupted_save(obj, f, *args, **kwargs):
            f.write(b"PK\x03\x04 partial")
            raise KeyboardInterrupt

        with mock.patch("mask2former_d2.checkpoint.torch.save", interrupted_save), \
                self.assertRaises(KeyboardInterrupt):
            self.checkpointer.save("model_0000014", iteration=14)
        self.assertEqual(sorted(os.listdir(self.dir)), ["last_checkpoint", "model_0000004.pth", "model_0000009.pth"])
        self.assertEqual(last_good_checkpoint(self.dir), self.weights[9])
        self.assertEqual(self.resume()["iteration"], 9)

    def test_last_checkpoint_is_written_after_the_checkpoint(self):
        order = []
        real_replace = os.replace

        def recording_replace(src, dst):
            order.append(os.path.basename(dst))
            real_replace(src, dst)

        with mock.patch("mask2former_d2.checkpoint.os.replace", recording_replace):
            self.checkpointer.save("model_0000014", iteration=14)
        self.assertEqual(order, ["model_0000014.pth", "last_checkpoint"])
        self.assertEqual(self.read_tag(), "model_0000014.pth")
        self.assertEqual(torch.load(os.path.join(self.dir, "model_0000014.pth"), weights_only=False)["iteration"], 14)

    def read_tag(self) -> str:
        with open(os.path.join(self.dir, "last_checkpoint")) as f:
            return f.read()


if __name__ == "__main__":
    unittest.main()
