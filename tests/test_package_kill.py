"""The installer killed (SIGKILL) at random moments leaves the old or the new version, never a broken one.
Slow (~1 min): run with `pytest -m slow tests/test_package_kill.py`. The full run: tools/kill_test_install.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


@pytest.mark.slow
def test_kill_installer_at_random_points(capsys):
    path = Path(__file__).resolve().parents[1] / "tools" / "kill_test_install.py"
    spec = importlib.util.spec_from_file_location("kill_test_install", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--trials", "100", "--seed", "7", "--json"])
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert rc == 0 and summary["trials"] == 100 and summary["broken"] == 0 and summary["recovered"] == 100
    # the kills must land on both sides of the switch, or the test proves nothing
    assert summary["old_version_after_kill"] >= 10 and summary["new_version_after_kill"] >= 10
    assert summary["killed_mid_install"] >= 50
