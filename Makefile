# The two commands of the README. Both set up .venv first (idempotent, offline-capable).
PY := .venv/bin/python

.PHONY: setup quickstart quickstart-video test

setup:
	bash scripts/setup_env.sh

quickstart: setup
	$(PY) tools/quickstart.py --output output/quickstart

quickstart-video: setup
	$(PY) tools/quickstart.py --video --output output/quickstart_video

test: setup
	.venv/bin/ruff check .
	M2F_SLOW=1 $(PY) -m pytest tests -q -ra --durations=10
