"""One OUTPUT_DIR, one run (mask2former_d2.engine.output_dir, through launch_main): a live run's
lock refuses a second run naming the first process; a dead run's lock is taken over with a
warning; a training run into a folder holding an earlier run is refused without --resume, and
--start-over moves the earlier run aside instead of deleting it; Ctrl-C ends with one line
naming the last good checkpoint."""
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import unittest

from mask2former_d2.checkpoint import atomic_write
from mask2former_d2.engine import default_argument_parser, launch_main
from mask2former_d2.engine.output_dir import LOCK_NAME, OutputDirLock

from ..common import TINY_CONFIG

# A process that holds OUTPUT_DIR's lock until its stdin closes.
HOLDER = """
import sys
from mask2former_d2.engine.output_dir import OutputDirLock
lock = OutputDirLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""


class _LaunchCase(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = os.path.join(tmp.name, "run")

    def launch(self, *argv: str, main_fn=None):
        """Runs launch_main on the tiny config with OUTPUT_DIR = self.dir; returns
        (exit message or None, stdout + stderr, whether main_fn ran)."""
        ran = []
        args = default_argument_parser().parse_args(
            ["--config-file", TINY_CONFIG, *argv, "OUTPUT_DIR", self.dir]
        )
        out = io.StringIO()
        message = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                launch_main(args, main_fn or (lambda a: ran.append(os.path.isfile(os.path.join(self.dir, LOCK_NAME)))))
            except SystemExit as e:
                message = e.code
        return message, out.getvalue(), ran

    def write_run(self, names=("model_0000009.pth", "last_checkpoint", "metrics.json", "config.yaml")):
        os.makedirs(self.dir, exist_ok=True)
        for name in names:
            with open(os.path.join(self.dir, name), "w") as f:
                f.write("model_0000009.pth" if name == "last_checkpoint" else name)


class TestLock(_LaunchCase):
    def test_live_run_refuses_a_second_one_naming_it(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, self.dir], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )
        try:
            self.assertEqual(holder.stdout.readline().strip(), "locked")
            message, _, ran = self.launch()
        finally:
            holder.stdin.close()
            holder.wait(timeout=60)
        self.assertEqual(ran, [])
        self.assertIsInstance(message, str)
        self.assertEqual(len(message.splitlines()), 1, message)
        self.assertIn(f"OUTPUT_DIR {self.dir} is in use by process {holder.pid} on ", message)
        self.assertIn("wait for it to finish, stop it, or choose another OUTPUT_DIR", message)

    def test_lock_is_held_during_the_run_and_released_after(self):
        message, _, ran = self.launch()
        self.assertIsNone(message)
        self.assertEqual(ran, [True])  # held while main_fn runs
        self.assertFalse(os.path.exists(os.path.join(self.dir, LOCK_NAME)))

    def test_stale_lock_is_taken_over_with_a_warning(self):
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, LOCK_NAME), "w") as f:
            json.dump({"pid": dead.pid, "host": os.uname().nodename, "started": "x", "command": "train_net.py"}, f)
        with self.assertLogs("mask2former_d2.engine.output_dir", "WARNING") as logs:
            message, _, ran = self.launch()
        self.assertIsNone(message)
        self.assertEqual(ran, [True])
        self.assertIn(f"taking over the lock of process {dead.pid} on {os.uname().nodename}", logs.output[0])
        self.assertIn("which is no longer running", logs.output[0])

    def test_same_process_takes_its_own_lock_again(self):
        lock = OutputDirLock(self.dir)
        lock.acquire()
        again = OutputDirLock(self.dir)
        again.acquire()  # e.g. a notebook calling launch_main twice
        again.release()
        self.assertFalse(os.path.exists(lock.path))


class TestPreviousRun(_LaunchCase):
    def test_training_over_an_earlier_run_is_refused_and_nothing_changes(self):
        self.write_run()
        before = {n: open(os.path.join(self.dir, n)).read() for n in os.listdir(self.dir)}
        message, _, ran = self.launch()
        self.assertEqual(ran, [])
        self.assertEqual(len(message.splitlines()), 1, message)
        self.assertIn(
            f"OUTPUT_DIR {self.dir} already holds a run (last_checkpoint, model_0000009.pth, metrics.json); "
            "add --resume to continue it, --start-over to move it into a previous_<time>/ subfolder and train "
            "from scratch, or choose another OUTPUT_DIR", message,
        )
        self.assertEqual({n: open(os.path.join(self.dir, n)).read() for n in os.listdir(self.dir)}, before)

    def test_resume_and_eval_only_are_allowed(self):
        self.write_run()
        for flags in (["--resume"], ["--eval-only", "--allow-random-weights"]):
            with self.subTest(flags=flags):
                message, _, ran = self.launch(*flags)
                self.assertIsNone(message)
                self.assertEqual(ran, [True])

    def test_start_over_moves_the_earlier_run_aside(self):
        self.write_run()
        message, out, ran = self.launch("--start-over")
        self.assertIsNone(message)
        self.assertEqual(ran, [True])
        moved = [n for n in os.listdir(self.dir) if n.startswith("previous_")]
        self.assertEqual(len(moved), 1, os.listdir(self.dir))
        self.assertEqual(
            sorted(os.listdir(os.path.join(self.dir, moved[0]))),
            ["config.yaml", "last_checkpoint", "metrics.json", "model_0000009.pth"],
        )
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(moved))  # the lock is released too
        self.assertIn(f"moved the earlier run's files of {self.dir} to {os.path.join(self.dir, moved[0])}", out)

    def test_resume_and_start_over_together(self):
        message, _, _ = self.launch("--resume", "--start-over")
        self.assertIn("--resume and --start-over contradict each other", message)


class TestInterrupt(_LaunchCase):
    def interrupted(self, args):
        raise KeyboardInterrupt

    def test_ctrl_c_names_the_last_good_checkpoint(self):
        os.makedirs(self.dir)
        checkpoint = os.path.join(self.dir, "model_0000009.pth")
        atomic_write(checkpoint, lambda f: f.write(b"weights"))
        atomic_write(os.path.join(self.dir, "last_checkpoint"), lambda f: f.write(b"model_0000009.pth"))
        status, out, _ = self.launch("--resume", main_fn=self.interrupted)
        self.assertEqual(status, 130)
        self.assertEqual(
            out.strip().splitlines()[-1].split(": ", 1)[1],
            f"interrupted; the last good checkpoint is {checkpoint} (continue with --resume)",
        )
        self.assertNotIn("Traceback", out)
        self.assertFalse(os.path.exists(os.path.join(self.dir, LOCK_NAME)))

    def test_ctrl_c_before_any_checkpoint(self):
        status, out, _ = self.launch(main_fn=self.interrupted)
        self.assertEqual(status, 130)
        self.assertEqual(out.strip().splitlines()[-1].split(": ", 1)[1],
                         f"interrupted; no checkpoint was saved in {self.dir}")


if __name__ == "__main__":
    unittest.main()
