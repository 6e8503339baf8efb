"""The shared-fixture rule of ``tests/common.py``: a missing fixture skips a test in a clone
without ``../shared`` and fails it under CI (``CI=true``)."""
import os
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

from tests.common import ROOT, in_ci, requires_fixture

PARITY_TESTS = ["tests/test_parity.py", "tests/modeling/video/test_parity_video.py"]


def _run(case: type) -> unittest.TestResult:
    result = unittest.TestResult()
    unittest.defaultTestLoader.loadTestsFromTestCase(case).run(result)
    return result


def _cases():
    """A decorated class and a class with a decorated method, both missing their fixture."""

    @requires_fixture(False, "no fixture at /nowhere")
    class WholeClass(unittest.TestCase):
        def test_a(self):
            pass

    class OneMethod(unittest.TestCase):
        @requires_fixture(False, "no fixture at /nowhere")
        def test_b(self):
            pass

        def test_c(self):
            pass

    return WholeClass, OneMethod


class TestRequiresFixture(unittest.TestCase):
    def test_ci_values(self):
        for value, expected in [("true", True), ("True", True), ("1", True), ("", False), ("false", False)]:
            with self.subTest(CI=value), mock.patch.dict(os.environ, {"CI": value}):
                self.assertEqual(in_ci(), expected)
        with mock.patch.dict(os.environ, {}, clear=True):
            self.assertFalse(in_ci())

    def test_missing_fixture_skips_outside_ci(self):
        with mock.patch.dict(os.environ, {"CI": ""}):
            whole, one = _cases()
        for case, skipped in [(whole, 1), (one, 1)]:
            result = _run(case)
            self.assertEqual((len(result.skipped), len(result.failures), len(result.errors)), (skipped, 0, 0))
            self.assertIn("no fixture at /nowhere", result.skipped[0][1])

    def test_missing_fixture_fails_in_ci(self):
        with mock.patch.dict(os.environ, {"CI": "true"}):
            whole, one = _cases()
        result = _run(whole)
        self.assertEqual(result.skipped, [])
        self.assertEqual(len(result.errors) + len(result.failures), 1)
        self.assertIn("CI=true but a shared fixture is missing: no fixture at /nowhere",
                      (result.errors + result.failures)[0][1])
        result = _run(one)
        self.assertEqual(result.skipped, [])
        self.assertEqual(len(result.failures) + len(result.errors), 1)  # test_c still passes
        self.assertEqual(result.testsRun, 2)

    def test_present_fixture_runs(self):
        for ci in ("true", ""):
            with mock.patch.dict(os.environ, {"CI": ci}):

                class Present(unittest.TestCase):
                    @requires_fixture(True, "unused")
                    def test_fails(self):
                        self.fail("ran")

            result = _run(Present)
            self.assertEqual((len(result.skipped), len(result.failures)), (0, 1))


class TestParityTestsWithoutShared(unittest.TestCase):
    """The parity test files themselves, run by pytest with ``M2F_SHARED`` pointing at an empty
    folder: skipped outside CI, failed in CI."""

    def _pytest(self, shared: str, ci: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "M2F_SHARED": shared, "CI": ci,
               "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *PARITY_TESTS],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )

    def test_skip_outside_ci_and_fail_in_ci(self):
        with tempfile.TemporaryDirectory() as empty:
            local = self._pytest(empty, "")
            ci = self._pytest(empty, "true")
        self.assertEqual(local.returncode, 0, local.stdout[-3000:])
        self.assertIn("2 skipped", local.stdout)
        self.assertIn("no parity fixtures", local.stdout)
        self.assertNotEqual(ci.returncode, 0, ci.stdout[-3000:])
        self.assertNotIn("skipped", ci.stdout.splitlines()[-1])
        self.assertIn("2 error", ci.stdout.splitlines()[-1], ci.stdout[-3000:])
        self.assertIn("CI=true but a shared fixture is missing", ci.stdout)


if __name__ == "__main__":
    unittest.main()
