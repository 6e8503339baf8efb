"""The training engine: Detectron2's ``DefaultTrainer`` with this project's ``build_*`` methods.

``train_net.py`` (and any script that trains or evaluates) wires it up in a few lines::

    from mask2former_d2.engine import Trainer, default_argument_parser, launch_main
    launch_main(default_argument_parser().parse_args(), Trainer)

``train_net_video.py`` does the same with :class:`VideoTrainer` (video instance segmentation).
"""

from .launch import default_argument_parser, launch_main, main, setup
from .trainer import Trainer
from .video import VideoTrainer

__all__ = ["Trainer", "VideoTrainer", "default_argument_parser", "launch_main", "main", "setup"]
