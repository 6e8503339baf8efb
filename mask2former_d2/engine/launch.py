"""Detectron2's ``setup(args)`` / ``main(args)`` convention for this project's entry points.

A user's mistake (a missing file, an unknown config key, dataset or registered name, an
impossible value) is reported by :func:`launch_main` as one line naming it, without a traceback
(``--debug`` shows it), and as far as possible before any worker is spawned or model built.
"""
import os
import sys
import time
from typing import Callable, NoReturn, Optional, Sequence, Tuple, Type

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import default_argument_parser as _d2_argument_parser
from detectron2.engine import default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..accel.precision import check_precision
from ..checkpoint import MaskFormerCheckpointer
from ..config import get_maskformer_cfg, validate_cfg
from ..evaluation import check_evaluation

__all__ = ["USER_ERRORS", "default_argument_parser", "setup", "main", "launch_main", "run_cli"]

# Exceptions that report a user's mistake in one line (config keys, values, files).
USER_ERRORS = (ValueError, KeyError, OSError)
# Exit status of a worker that has printed a user error (its parent then exits quietly).
_USER_ERROR_EXIT = 3
# Switches that argparse's REMAINDER leaves in ``opts`` when written after the overrides.
_FLAGS = ("--resume", "--eval-only", "--debug")
_OPTIONS = ("--config-file", "--num-gpus", "--num-machines", "--machine-rank", "--dist-url")


def default_argument_parser(epilog=None):
    """Detectron2's parser plus ``--debug`` (full tracebacks for user errors)."""
    parser = _d2_argument_parser(epilog)
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of a user error (bad file, key, value)"
    )
    return parser


def setup(args):
    """The frozen config of ``args.config_file`` + ``args.opts``; logging and output dir set up."""
    cfg = get_maskformer_cfg(args.config_file, args.opts)
    validate_cfg(cfg)
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
    return cfg


def main(args, trainer_cls):
    """Trains with ``trainer_cls``, or with ``--eval-only`` evaluates and returns the results."""
    cfg = setup(args)
    if args.eval_only:
        model = trainer_cls.build_model(cfg)
        MaskFormerCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
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


def _take_trailing_flags(args) -> None:
    """Takes ``--resume`` / ``--eval-only`` / ``--debug`` written after the ``KEY VALUE``
    overrides out of ``args.opts`` (argparse's REMAINDER keeps them there) and sets them; other
    options there are an error."""
    opts = list(args.opts or [])
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
    cfg = get_maskformer_cfg(args.config_file, args.opts)
    validate_cfg(cfg, datasets=False)  # datasets may be registered by main_fn in the workers
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


def _error_line(e: BaseException) -> str:
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    prog = os.path.basename(sys.argv[0]) or "train_net.py"
    return f"{prog}: error: {message} (--debug shows the traceback)"


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


def launch_main(args, main_fn):
    """Detectron2's ``launch`` of ``main_fn(args)`` on ``args.num_gpus`` processes per machine.

    The config and the device are checked first; a user error (see :data:`USER_ERRORS`) then
    exits with status 1 and one line on stderr, unless ``args.debug``."""
    debug = bool(getattr(args, "debug", False)) or "--debug" in (args.opts or [])
    try:
        _take_trailing_flags(args)
        _check_before_launch(args)
        print("Command Line Args:", args)
        launch(
            _main_then_shutdown,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(main_fn, args),
        )
    except mp.ProcessExitedException as e:
        if e.exit_code != _USER_ERROR_EXIT:
            raise
        sys.exit(1)  # the worker printed the error
    except USER_ERRORS as e:
        if debug:
            raise
        sys.exit(_error_line(e))
