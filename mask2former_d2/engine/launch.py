"""Detectron2's ``setup(args)`` / ``main(args)`` convention for this project's entry points.

A user's mistake (a missing file, an unknown config key, dataset or registered name, an
impossible value) is reported by :func:`launch_main` as one line naming it, without a traceback
(``--debug`` shows it; the log file keeps it), and as far as possible before any worker is
spawned or model built.

Work is never lost: the launching process holds ``OUTPUT_DIR``'s lock for the whole run, a
training run refuses a folder holding an earlier run unless ``--resume`` or ``--start-over``
says what to do with it (:mod:`.output_dir`), checkpoints are written atomically
(:class:`~mask2former_d2.checkpoint.MaskFormerCheckpointer`) and Ctrl-C ends with one line
naming the last complete checkpoint.

Config overrides are ``KEY VALUE`` pairs after the options, as in Detectron2, or after
``--opts`` as in the demos; both forms are accepted.
"""
import argparse
import logging
import os
import re
import sys
import time
from typing import Callable, List, NoReturn, Optional, Sequence, Tuple, Type

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import default_argument_parser as _d2_argument_parser
from detectron2.engine import default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..accel.precision import check_precision
from ..checkpoint import MaskFormerCheckpointer, last_good_checkpoint
from ..config import get_maskformer_cfg, validate_cfg
from ..data.datasets.custom import add_dataset_argument
from ..evaluation import check_evaluation
from .output_dir import OutputDirLock, check_previous_run

__all__ = [
    "USER_ERRORS", "default_argument_parser", "setup", "main", "launch_main", "run_cli", "overrides_after_opts",
    "overrides_without_opts",
]

# Exceptions that report a user's mistake in one line (config keys, values, files).
USER_ERRORS = (ValueError, KeyError, OSError)
# Exit status of a worker that has printed a user error (its parent then exits quietly).
_USER_ERROR_EXIT = 3
# Switches that argparse's REMAINDER leaves in ``opts`` when written after the overrides.
_FLAGS = ("--resume", "--eval-only", "--debug", "--start-over", "--allow-random-weights")
# Exit status after Ctrl-C (128 + SIGINT), as shells report it.
_INTERRUPTED_EXIT = 130
_OPTIONS = ("--config-file", "--num-gpus", "--num-machines", "--machine-rank", "--dist-url", "--dataset")


def default_argument_parser(epilog=None):
    """Detectron2's parser plus ``--debug`` (full tracebacks for user errors), ``--start-over``
    (train from scratch into a folder holding an earlier run, which is moved aside),
    ``--allow-random-weights`` (``--eval-only`` without ``MODEL.WEIGHTS``) and ``--opts`` (the
    demos' spelling of the trailing ``KEY VALUE`` overrides) and ``--dataset`` (a dataset registered from its files)."""
    parser = _d2_argument_parser(epilog)
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of a user error (bad file, key, value)"
    )
    parser.add_argument(
        "--start-over", action="store_true",
        help="OUTPUT_DIR holds an earlier run: move its files into OUTPUT_DIR/previous_<time>/ and "
        "train from scratch (without it, such a folder needs --resume)",
    )
    parser.add_argument(
        "--allow-random-weights", action="store_true",
        help="with --eval-only: evaluate even without MODEL.WEIGHTS (a randomly initialised model)",
    )
    parser.add_argument(
        "--opts", dest="dash_opts", default=[], nargs=argparse.REMAINDER, metavar="KEY VALUE",
        help="config overrides, as the trailing KEY VALUE pairs (either form works)",
    )
    return add_dataset_argument(parser)


class _HideUserErrorTracebacks(logging.Filter):
    """Drops, from the console, the traceback Detectron2 logs ("Exception during training")
    for an exception that :func:`launch_main` reports in one line; the log file keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        # FloatingPointError: a non-finite loss, reported by Trainer.train as a ValueError.
        return not isinstance(exc, USER_ERRORS + (KeyboardInterrupt, FloatingPointError))


def _quiet_console_tracebacks() -> None:
    for name in ("detectron2", "mask2former_d2", "fvcore"):
        for handler in logging.getLogger(name).handlers:
            # Detectron2's log file is a StreamHandler too; only the console ones are filtered.
            streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
            console = isinstance(handler, logging.StreamHandler) and handler.stream in streams
            if console and not any(
                isinstance(f, _HideUserErrorTracebacks) for f in handler.filters
            ):
                handler.addFilter(_HideUserErrorTracebacks())


def setup(args):
    """The frozen config of ``args.config_file`` + ``args.opts``; logging and output dir set up."""
    cfg = get_maskformer_cfg(args.config_file, args.opts)
    validate_cfg(cfg, num_processes=comm.get_world_size(), training=not getattr(args, "eval_only", False))
    _check_weights(cfg, args)
    if cfg.MODEL.DEVICE == "cuda" and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    # An inference precision the device has no units for: one error before any work.
    check_precision(cfg.MODEL.MASK_FORMER.TEST.PRECISION, torch.device(cfg.MODEL.DEVICE).type)
    cfg.freeze()
    procs = comm.get_local_size()
    if cfg.MODEL.DEVICE == "cpu" and procs > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Share the cores between the processes: oversubscribed threads made training ~10x slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs))
    default_setup(cfg, args)
    rank = dist.get_rank() if dist.is_initialized() else 0
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=rank, name="mask2former_d2")
    if not getattr(args, "debug", False):
        _quiet_console_tracebacks()
    return cfg


def main(args, trainer_cls):
    """Trains with ``trainer_cls``, or with ``--eval-only`` evaluates and returns the results."""
    cfg = setup(args)
    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        # Evaluation uses the weights as they are: a head that does not fit is an error.
        strict = not getattr(args, "allow_random_weights", False)
        MaskFormerCheckpointer(model, save_dir=cfg.OUTPUT_DIR, for_inference=strict).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = trainer_cls.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(trainer_cls.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    for name in cfg.DATASETS.TEST:  # the final evaluation's ground truth, before training
        check_evaluation(cfg, name)
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def _main_then_shutdown(main_fn, args):
    """Runs ``main_fn(args)``; in a multi-process run every worker then waits for the others and
    destroys the process group (a gloo worker that exits with the group alive can abort at
    interpreter shutdown). On an exception the group is left alone: waiting in a barrier would
    hang, and the launcher stops the other workers."""
    try:
        result = main_fn(args)
    except KeyboardInterrupt:
        if comm.get_world_size() == 1:
            raise
        sys.exit(_INTERRUPTED_EXIT)  # the launching process says where the run stopped
    except USER_ERRORS as e:
        if comm.get_world_size() == 1 or getattr(args, "debug", False):
            raise
        # A spawned worker: the parent only sees a traceback text; report the line here, once:
        # the first worker does, the others give it time to (the parent then stops them all).
        if comm.get_rank() != 0:
            time.sleep(10)
        print(_error_line(e), file=sys.stderr, flush=True)
        sys.exit(_USER_ERROR_EXIT)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return result


def _check_weights(cfg, args) -> None:
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights) and not args.resume:
        what = "is a directory" if os.path.isdir(weights) else "no such file"
        raise FileNotFoundError(f"MODEL.WEIGHTS {weights}: {what}; expected a .pkl or .pth weight file")
    if (
        getattr(args, "eval_only", False)
        and not weights
        and not getattr(args, "allow_random_weights", False)
        and not (args.resume and last_good_checkpoint(cfg.OUTPUT_DIR))
    ):
        raise ValueError(
            "--eval-only without MODEL.WEIGHTS would evaluate a randomly initialised model; give "
            "MODEL.WEIGHTS <file>, --resume to evaluate OUTPUT_DIR's last checkpoint, or "
            "--allow-random-weights to evaluate the random model on purpose"
        )


def _take_trailing_flags(args) -> None:
    """Takes ``--resume`` / ``--eval-only`` / ``--debug`` written after the ``KEY VALUE``
    overrides out of ``args.opts`` (argparse's REMAINDER keeps them there) and sets them; other
    options there are an error."""
    # "--opts" before the overrides lands in dash_opts, after some of them in opts.
    opts = [t for t in list(args.opts or []) + list(getattr(args, "dash_opts", None) or []) if t != "--opts"]
    args.opts, args.dash_opts = opts, []
    for token in opts:
        if token in _OPTIONS or any(str(token).startswith(o + "=") for o in _OPTIONS):
            raise ValueError(
                f"{token} is written after the KEY VALUE config overrides, where it reads as a "
                "config key; put it before them"
            )
    flags = [t for t in opts if t in _FLAGS]
    if flags:
        for flag in flags:
            setattr(args, flag[2:].replace("-", "_"), True)
        args.opts = [t for t in opts if t not in _FLAGS]
        print(f"note: {' '.join(flags)} taken as an option; options belong before the KEY VALUE overrides")


def _check_before_launch(args) -> None:
    """What can be checked once, in the launching process: the config and the device."""
    for option, value in (("--num-gpus", args.num_gpus), ("--num-machines", args.num_machines)):
        if value < 1:
            raise ValueError(f"{option} must be >= 1 (processes per machine / machines); got {value}")
    cfg = get_maskformer_cfg(args.config_file, args.opts)
    # Datasets may be registered by main_fn in the workers: checked there (setup).
    validate_cfg(
        cfg, datasets=False, num_processes=args.num_gpus * args.num_machines, training=not args.eval_only
    )
    _check_weights(cfg, args)
    procs = args.num_gpus
    if procs > 1 and cfg.MODEL.DEVICE.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"--num-gpus {procs} with MODEL.DEVICE {cfg.MODEL.DEVICE}, but CUDA is not available "
                f"on this machine; add MODEL.DEVICE cpu to run {procs} CPU processes, or use a GPU machine"
            )
        if procs > torch.cuda.device_count():
            raise ValueError(
                f"--num-gpus {procs}, but only {torch.cuda.device_count()} CUDA devices are visible"
            )
    return cfg


def _error_line(e: BaseException) -> str:
    message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if len(lines) > 1:
        # A DataLoader worker's error arrives with its traceback text; its last line names it.
        message = lines[-1].strip()
    prog = os.path.basename(sys.argv[0]) or "train_net.py"
    return f"{prog}: error: {message} (--debug shows the traceback)"


# A config key as written in an override (MODEL.WEIGHTS, SOLVER.BASE_LR, ...).
_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def overrides_after_opts(argv: Optional[Sequence[str]]) -> List[str]:
    """``argv`` (default ``sys.argv[1:]``) for a parser whose overrides follow ``--opts``, with
    ``--opts`` inserted before trailing ``KEY VALUE`` overrides written without it, so that both
    ``... --opts MODEL.WEIGHTS w.pkl`` and ``... MODEL.WEIGHTS w.pkl`` work."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--opts" in argv:
        return argv
    for i, token in enumerate(argv):
        if _CONFIG_KEY.match(token) and not os.path.exists(token):
            return argv[:i] + ["--opts"] + argv[i:]
    return argv


def overrides_without_opts(argv: Optional[Sequence[str]]) -> List[str]:
    """``argv`` (default ``sys.argv[1:]``) for a parser whose overrides are trailing ``KEY
    VALUE`` pairs (Detectron2's form), with a ``--opts`` written before them dropped."""
    return [t for t in (sys.argv[1:] if argv is None else argv) if t != "--opts"]


def run_cli(
    main_fn: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]], prog: str,
    errors: Tuple[Type[BaseException], ...],
) -> NoReturn:
    """Runs ``main_fn(argv)`` and exits with the status it returns; one of ``errors`` (a user's
    mistake) becomes the one line ``{prog}: error: {message}`` on stderr and exit status 1,
    without a traceback. For the scripts that take a ``main(argv)`` rather than Detectron2's
    ``main(args)`` (demos, tools)."""
    try:
        status = main_fn(argv)
    except errors as e:
        sys.exit(f"{prog}: error: {e}")
    sys.exit(status)


def _interrupted_line(output_dir: str) -> str:
    prog = os.path.basename(sys.argv[0]) or "train_net.py"
    last = last_good_checkpoint(output_dir) if output_dir else None
    if last is None:
        return f"{prog}: interrupted; no checkpoint was saved in {output_dir or 'OUTPUT_DIR'}"
    return f"{prog}: interrupted; the last good checkpoint is {last} (continue with --resume)"


def launch_main(args, main_fn):
    """Detectron2's ``launch`` of ``main_fn(args)`` on ``args.num_gpus`` processes per machine.

    The config and the device are checked first, then ``OUTPUT_DIR`` is locked (and, for
    training, checked for an earlier run; see :mod:`.output_dir`) by the launching process of
    machine 0. A user error (see :data:`USER_ERRORS`) then exits with status 1 and one line on
    stderr, unless ``args.debug``; Ctrl-C exits with status 130 and one line naming the last
    good checkpoint."""
    debug = bool(getattr(args, "debug", False)) or "--debug" in (args.opts or [])
    lock, output_dir = None, ""
    try:
        _take_trailing_flags(args)
        cfg = _check_before_launch(args)
        output_dir = cfg.OUTPUT_DIR
        if args.machine_rank == 0 and output_dir:
            lock = OutputDirLock(output_dir)
            lock.acquire()
            if not args.eval_only:
                check_previous_run(
                    output_dir, resume=args.resume, start_over=getattr(args, "start_over", False)
                )
        print("Command Line Args:", args)
        launch(
            _main_then_shutdown,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(main_fn, args),
        )
    except KeyboardInterrupt:
        print(_interrupted_line(output_dir), file=sys.stderr, flush=True)
        sys.exit(_INTERRUPTED_EXIT)
    except mp.ProcessExitedException as e:
        if e.exit_code == _INTERRUPTED_EXIT:
            print(_interrupted_line(output_dir), file=sys.stderr, flush=True)
            sys.exit(_INTERRUPTED_EXIT)
        if e.exit_code != _USER_ERROR_EXIT:
            raise
        sys.exit(1)  # the worker printed the error
    except USER_ERRORS as e:
        if debug:
            raise
        sys.exit(_error_line(e))
    finally:
        if lock is not None:
            lock.release()
