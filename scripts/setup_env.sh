#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv.
# Idempotent: a second run only checks what is there. Works offline where the
# package index is reachable (PyPI or a local mirror) and GitHub is not.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
D2_GIT=https://github.com/facebookresearch/detectron2

log() { echo "[setup] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP="$VPY -m pip --disable-pip-version-check"

have() { "$VPY" - "$@" <<'PYEOF' >/dev/null 2>&1
import importlib, sys
for m in sys.argv[1:]:
    importlib.import_module(m)
PYEOF
}

if ! have torch torchvision; then
  log "installing $TORCH_SPEC"
  $PIP install $TORCH_SPEC
fi

# Runtime dependencies of detectron2 and of this project. numpy<2 because
# detectron2's released sources predate numpy 2.
if ! have cv2 scipy fvcore iopath pycocotools yacs omegaconf hydra tabulate termcolor pytest matplotlib shapely; then
  log "installing runtime dependencies"
  $PIP install "numpy<2" "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" pycocotools \
    opencv-python-headless scipy "Pillow>=7.1" matplotlib termcolor "yacs>=0.1.8" tabulate \
    cloudpickle "tqdm>4.29.0" tensorboard "omegaconf>=2.1,<2.4" "hydra-core>=1.1" packaging \
    pytest shapely
fi

if ! have detectron2 detectron2.projects.deeplab; then
  if timeout 15 git ls-remote "$D2_GIT" HEAD >/dev/null 2>&1; then
    log "installing detectron2 from $D2_GIT"
    $PIP install --no-build-isolation "git+$D2_GIT"
  else
    log "GitHub unreachable: installing detectron2's sources from the PyPI republish sal-detectron2"
    SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # The wheel is tagged cp310; its Python sources run on newer Pythons.
    # Its compiled extension is for 3.10 and is never loaded by this project.
    $PIP install --no-deps --only-binary=:all: --python-version 3.10 --upgrade \
      --target "$SITE" sal-detectron2==0.7.2
  fi
fi

# The linter that `make test` runs first (pinned: a newer ruff may add findings).
if [ "$("$VENV/bin/ruff" --version 2>/dev/null)" != "ruff 0.17.6" ]; then
  log "installing ruff 0.17.6"
  $PIP install "ruff==0.17.6"
fi

if ! have panopticapi; then
  log "installing panopticapi"
  $PIP install --no-deps panopticapi-lite
fi

# Checked by distribution metadata: from the repository root the package would import
# without being installed.
if ! "$VPY" -c 'import importlib.metadata as m; m.version("mask2former_d2")' >/dev/null 2>&1; then
  log "installing mask2former_d2 (editable)"
  $PIP install --no-deps --no-build-isolation -e .
fi
# The optional export extra (ONNX export and ONNX Runtime), which the tests use. numpy<2 again:
# the resolver would otherwise upgrade numpy for the newest ml_dtypes.
if ! have onnx onnxruntime onnxscript; then
  log "installing the export extra (onnx, onnxruntime, onnxscript)"
  $PIP install --no-build-isolation "numpy<2" -e ".[export]"
fi
# The optional Hugging Face extra (transformers, safetensors): the converters' tests build tiny
# Hugging Face models with it. numpy<2 for the same reason as above.
if ! have transformers safetensors; then
  log "installing the hf extra (transformers, safetensors)"
  $PIP install --no-build-isolation "numpy<2" -e ".[hf]"
fi
"$VPY" -c 'import torch, detectron2, mask2former_d2; print("[setup] ready: torch", torch.__version__, "detectron2", detectron2.__version__)'
