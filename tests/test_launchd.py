"""The LaunchAgent plist and `watchtrain service`."""

from __future__ import annotations

import os
import plistlib
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import launchagent
from tests.conftest import ROOT


def test_rendered_plist_has_the_keys_launchd_needs(tmp_path):
    config = tmp_path / "watchtrain.toml"
    plist = plistlib.loads(plistlib.dumps(launchagent.render(config, python="/opt/py/bin/python3")))
    assert plist["Label"] == "com.watchtrain.daemon"
    assert plist["ProgramArguments"] == ["/opt/py/bin/python3", "-m", "daemon", "run", "--config", str(config)]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    logs = str(Path.home() / "Library" / "Logs" / "watchtrain")
    assert plist["StandardOutPath"].startswith(logs) and plist["StandardErrorPath"].startswith(logs)
    assert "@" not in plistlib.dumps(plist).decode()


def test_template_in_repo_is_a_valid_plist():
    with open(ROOT / "launchd" / "com.watchtrain.daemon.plist", "rb") as f:
        assert plistlib.load(f)["Label"] == "com.watchtrain.daemon"


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


@pytest.mark.skipif(sys.platform == "darwin", reason="would load a real agent into launchd")
def test_service_install_status_uninstall_without_launchctl(tmp_path, subset):
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "watchtrain.toml"
    config.write_text(f'[[project]]\nname = "M"\ndataset = "{subset["train"]}"\noutput = "{tmp_path / "out"}"\n')
    done = _cli("service", "install", "--config", str(config), home=home)
    assert done.returncode == 0, done.stderr
    assert "launchctl is not available" in done.stdout
    written = home / "Library" / "LaunchAgents" / "com.watchtrain.daemon.plist"
    with open(written, "rb") as f:
        plist = plistlib.load(f)
    assert plist["ProgramArguments"][0] == sys.executable
    assert plist["ProgramArguments"][-1] == str(config)
    assert (home / "Library" / "Logs" / "watchtrain").is_dir()
    assert "installed" in _cli("service", "status", home=home).stdout
    assert _cli("service", "uninstall", home=home).returncode == 0
    assert not written.exists()


def test_service_install_refuses_a_bad_config(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[[project]]\nname = 1\n")
    done = _cli("service", "install", "--config", str(config), home=tmp_path)
    assert done.returncode == 2 and str(config) in done.stderr
    assert not (tmp_path / "Library" / "LaunchAgents").exists()
