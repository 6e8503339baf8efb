"""Output parity with the published Mask2Former-VIS on the shared video fixture(s).

Runs ``../shared/tools/parity_video.py check`` as a developer would: it builds ``VideoMaskFormer``
from the fixture's config, loads the released-format checkpoint through Detectron2's
checkpointer (strict key matching) and compares the 10 per-video predictions.
"""
import unittest
from pathlib import Path

from tests.common import SHARED, check_parity_fixtures, requires_fixture

TOOL = Path(SHARED) / "tools" / "parity_video.py"
FIXTURES = sorted((Path(SHARED) / "fixtures" / "parity_video").glob("*/weights.pkl"))


@requires_fixture(
    TOOL.is_file() and bool(FIXTURES),
    f"no video parity fixtures: {SHARED}/fixtures/parity_video and {TOOL} are absent "
    "(they live beside the repository on the developers' machines and in CI)",
)
class TestVideoParity(unittest.TestCase):
    def test_fixtures(self):
        check_parity_fixtures(self, TOOL, [w.parent for w in FIXTURES])


if __name__ == "__main__":
    unittest.main()
