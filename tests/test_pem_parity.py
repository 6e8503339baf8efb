"""Output parity of PEM with its published implementation on the shared PEM fixture(s).

Runs ``../shared/tools/parity.py check`` as a developer would: the model is built from the
fixture's config (PEM's Cityscapes panoptic STDC1 config), PEM's checkpoint is loaded with
Detectron2's checkpointer (no missing or unexpected keys allowed) and the semantic and panoptic
outputs are compared with those recorded from PEM's code.
"""
import unittest
from pathlib import Path

from tests import common

SHARED = Path(common.SHARED)
FIXTURES = sorted((SHARED / "fixtures" / "parity_pem").glob("*/weights.pkl"))


@unittest.skipUnless(
    (SHARED / "tools" / "parity.py").is_file() and FIXTURES,
    f"no PEM parity fixtures: {SHARED}/fixtures/parity_pem and {SHARED}/tools/parity.py are absent",
)
class TestPEMParity(unittest.TestCase):
    def test_fixtures(self):
        common.check_parity_fixtures(self, SHARED / "tools" / "parity.py", [w.parent for w in FIXTURES])


if __name__ == "__main__":
    unittest.main()
