"""One run per ``OUTPUT_DIR``, and no run silently replaced.

* :class:`OutputDirLock`: ``OUTPUT_DIR/.lock`` names the process (host, pid, command) of the run
  using the folder. A second run on the same folder is refused while that process is alive; a
  lock left by a process that no longer exists (killed, machine rebooted) is taken over with a
  warning. The launching process holds it, once for all the workers it spawns (rank 0's machine
  in a multi-machine run).
* :func:`check_previous_run`: a training run without ``--resume`` into a folder that holds
  checkpoints or metrics of an earlier run is refused, naming ``--resume`` (continue it) and
  ``--start-over`` (move the earlier run's files into ``OUTPUT_DIR/previous_<time>/`` and train
  from scratch); a new ``OUTPUT_DIR`` is the third way.
"""
import datetime
import glob
import json
import logging
import os
import shlex
import socket
import sys
from typing import List, Optional

__all__ = ["OutputDirLock", "check_previous_run", "previous_run_files", "move_previous_run"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
# What an earlier run leaves that a new one would replace or append to.
_RUN_PATTERNS = ("last_checkpoint", "model_*.pth", "metrics.json")
# Also moved aside by --start-over, so the new run's folder holds only the new run.
_RUN_EXTRAS = ("config.yaml", "log.txt*", "events.out.tfevents.*", "inference", "inference_TTA")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class OutputDirLock:
    """The lock of one ``OUTPUT_DIR`` (see the module docstring); a context manager.

    Args:
        output_dir: the run's folder (created if missing).
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.held = False

    def _owner(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _describe(self, owner: dict) -> str:
        return (
            f"process {owner.get('pid')} on {owner.get('host')} (started {owner.get('started')}: "
            f"{owner.get('command')})"
        )

    def acquire(self) -> None:
        """Takes the lock.

        Raises:
            ValueError: naming the live process that holds it.
        """
        os.makedirs(self.output_dir, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in sys.argv),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:  # being written by the other process, or an empty file
                    owner = {"pid": None, "host": "?"}
                if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                    return self._write_over(me)  # this process already holds it
                if owner.get("host") != me["host"] and owner.get("pid") is not None:
                    raise ValueError(
                        f"OUTPUT_DIR {self.output_dir} is in use by {self._describe(owner)}; choose "
                        f"another OUTPUT_DIR, or delete {self.path} if that process is not running"
                    )
                if owner.get("pid") is not None and _pid_alive(int(owner["pid"])):
                    raise ValueError(
                        f"OUTPUT_DIR {self.output_dir} is in use by {self._describe(owner)}; wait for it "
                        "to finish, stop it, or choose another OUTPUT_DIR"
                    )
                logger.warning(
                    "OUTPUT_DIR %s: taking over the lock of %s, which is no longer running",
                    self.output_dir, self._describe(owner),
                )
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise ValueError(f"OUTPUT_DIR {self.output_dir}: another run took the lock {self.path} at the same time")

    def _write_over(self, me: dict) -> None:
        with open(self.path, "w") as f:
            json.dump(me, f)
        self.held = True

    def release(self) -> None:
        """Removes the lock if this process holds it."""
        if not self.held:
            return
        owner = self._owner()
        if owner is None or owner.get("pid") == os.getpid():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.held = False

    def __enter__(self) -> "OutputDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def previous_run_files(output_dir: str) -> List[str]:
    """The files of ``output_dir`` that show an earlier training run (checkpoints, metrics)."""
    found = []
    for pattern in _RUN_PATTERNS:
        found.extend(sorted(glob.glob(os.path.join(glob.escape(output_dir), pattern))))
    return [os.path.basename(f) for f in found]


def move_previous_run(output_dir: str) -> Optional[str]:
    """Moves the earlier run's files (checkpoints, metrics, config, logs, inference results) into
    ``output_dir/previous_<time>/``; returns that folder, or None when there was nothing."""
    names = []
    for pattern in _RUN_PATTERNS + _RUN_EXTRAS:
        names.extend(glob.glob(os.path.join(glob.escape(output_dir), pattern)))
    if not names:
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    target = os.path.join(output_dir, f"previous_{stamp}")
    suffix = 1
    while os.path.exists(target):
        target = os.path.join(output_dir, f"previous_{stamp}_{suffix}")
        suffix += 1
    os.makedirs(target)
    for path in sorted(set(names)):
        os.replace(path, os.path.join(target, os.path.basename(path)))
    return target


def check_previous_run(output_dir: str, *, resume: bool, start_over: bool) -> None:
    """Refuses to train into ``output_dir`` over an earlier run unless told what to do with it.

    Raises:
        ValueError: naming the files found, ``--resume`` and ``--start-over``.
    """
    if resume and start_over:
        raise ValueError("--resume and --start-over contradict each other; give one of them")
    found = previous_run_files(output_dir)
    if not found or resume:
        return
    if start_over:
        moved = move_previous_run(output_dir)
        print(f"--start-over: moved the earlier run's files of {output_dir} to {moved}")
        return
    shown = ", ".join(found[:4]) + (f" (+{len(found) - 4} more)" if len(found) > 4 else "")
    raise ValueError(
        f"OUTPUT_DIR {output_dir} already holds a run ({shown}); add --resume to continue it, "
        "--start-over to move it into a previous_<time>/ subfolder and train from scratch, or "
        "choose another OUTPUT_DIR"
    )
