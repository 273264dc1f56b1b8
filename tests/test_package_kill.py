"""The installer killed (SIGKILL) at random moments leaves the old or the new version, never a broken one (slow,
~1 min: `pytest -m slow tests/test_package_kill.py`; the full run: tools/kill_test_install.py); two installers at
once never lose an install (tools/race_test_install.py)."""

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


def test_two_installers_at_once_never_lose_an_install(tmp_path):
    """tools/race_test_install.py in small: pairs of real processes start installing into one fresh root at the
    same instant (the same package twice; v1 and v2; a package refused by its probe and a good one). Measured
    before the one root lock: 2 lost installs and 2 tracebacks in 12 pairs."""
    path = Path(__file__).resolve().parents[1] / "tools" / "race_test_install.py"
    spec = importlib.util.spec_from_file_location("race_test_install", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    summary = mod.run(9, tmp_path)
    assert summary["lost"] == 0 and summary["broken"] == 0 and summary["unclean_refusals"] == 0, summary
