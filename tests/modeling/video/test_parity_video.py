"""Output parity with the published Mask2Former-VIS on the shared video fixture(s).

Runs ``../shared/tools/parity_video.py check`` as a developer would: it builds ``VideoMaskFormer``
from the fixture's config, loads the released-format checkpoint through Detectron2's
checkpointer (strict key matching) and compares the 10 per-video predictions.
"""
import os
import subprocess
import sys
import unittest
from pathlib import Path

from tests.common import SHARED

ROOT = Path(__file__).resolve().parents[3]
TOOL = Path(SHARED) / "tools" / "parity_video.py"
FIXTURES = sorted((Path(SHARED) / "fixtures" / "parity_video").glob("*/weights.pkl"))


@unittest.skipUnless(
    TOOL.is_file() and FIXTURES,
    f"no video parity fixtures: {SHARED}/fixtures/parity_video and {TOOL} are absent "
    "(they live beside the repository on the developers' machines and in CI)",
)
class TestVideoParity(unittest.TestCase):
    def test_fixtures(self):
        for weights in FIXTURES:
            fixture = weights.parent
            with self.subTest(fixture=fixture.name):
                proc = subprocess.run(
                    [sys.executable, str(TOOL), "check", "--fixture", str(fixture)],
                    cwd=ROOT,
                    # This checkout's package, even where another one is installed.
                    env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                out = proc.stdout + proc.stderr
                self.assertEqual(proc.returncode, 0, out[-4000:])
                self.assertIn("PARITY OK", proc.stdout, out[-4000:])


if __name__ == "__main__":
    unittest.main()
