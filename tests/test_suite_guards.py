"""The suite cannot hang: a test that blocks fails, named, after the configured timeout."""

import subprocess
import sys

from tests.conftest import REPO


def test_a_hanging_test_fails_by_name_after_the_timeout(tmp_path):
    hanging = tmp_path / "test_hangs.py"
    hanging.write_text("import time\n\n\ndef test_waits_forever():\n    time.sleep(3600)\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=2"]
        + ["--rootdir", str(REPO), "-c", str(REPO / "setup.cfg"), str(hanging)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout[-2000:]
    assert "::test_waits_forever - Failed: Timeout (>2.0s)" in done.stdout


def test_the_configured_timeout_guards_every_test():
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "--timeout=TIMEOUT" in done.stdout
    config = (REPO / "setup.cfg").read_text()
    assert "\ntimeout = 1200\n" in config and "pytest-timeout>=2.1" in config
