"""Output parity with the published Mask2Former on the shared fixture(s).

Runs ``../shared/tools/parity.py check`` exactly as a developer would: it builds the model from
the fixture's config, loads the released-format checkpoint through Detectron2's checkpointer
(strict key matching) and compares semantic, panoptic and instance outputs.
"""
import unittest
from pathlib import Path

from tests import common

SHARED = Path(common.SHARED)
FIXTURES = sorted((SHARED / "fixtures" / "parity").glob("*/weights.pkl"))


@common.requires_fixture(
    (SHARED / "tools" / "parity.py").is_file() and bool(FIXTURES),
    f"no parity fixtures: {SHARED}/fixtures/parity and {SHARED}/tools/parity.py are absent "
    "(they live beside the repository on the developers' machines and in CI)",
)
class TestParity(unittest.TestCase):
    def test_fixtures(self):
        common.check_parity_fixtures(self, SHARED / "tools" / "parity.py", [w.parent for w in FIXTURES])


if __name__ == "__main__":
    unittest.main()
