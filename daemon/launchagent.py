"""Install, remove and inspect the LaunchAgent that keeps the daemon running on macOS."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

LABEL = "com.watchtrain.daemon"
TEMPLATE = "com.watchtrain.daemon.plist"


def agents_dir() -> Path:
    return Path.home() / "Library" / "LaunchAgents"


def logs_dir() -> Path:
    return Path.home() / "Library" / "Logs" / "watchtrain"


def plist_path() -> Path:
    return agents_dir() / f"{LABEL}.plist"


def render(config: Path, python: str = sys.executable) -> dict[str, Any]:
    """The template with this interpreter, the config and the log folder filled in."""
    with resources.files("launchd").joinpath(TEMPLATE).open("rb") as f:
        plist = plistlib.load(f)
    values = {"@PYTHON@": python, "@CONFIG@": str(Path(config).expanduser().resolve()),
              "@HOME@": str(Path.home()), "@LOGS@": str(logs_dir())}

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            for key, new in values.items():
                value = value.replace(key, new)
            return value
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    return fill(plist)


def _launchctl(*args: str) -> subprocess.CompletedProcess[str] | None:
    if shutil.which("launchctl") is None:
        return None
    return subprocess.run(["launchctl", *args], capture_output=True, text=True)


def _domain() -> str:
    return f"gui/{os.getuid()}"


def install(config: Path) -> str:
    plist = render(config)
    logs_dir().mkdir(parents=True, exist_ok=True)
    agents_dir().mkdir(parents=True, exist_ok=True)
    tmp = plist_path().with_suffix(".plist.tmp")
    with open(tmp, "wb") as f:
        plistlib.dump(plist, f)
    os.replace(tmp, plist_path())
    _launchctl("bootout", f"{_domain()}/{LABEL}")  # reinstall: replace a loaded agent
    result = _launchctl("bootstrap", _domain(), str(plist_path()))
    if result is None:
        return f"wrote {plist_path()}; launchctl is not available on this system (macOS only), nothing loaded"
    if result.returncode != 0:
        raise RuntimeError(f"launchctl bootstrap failed: {result.stderr.strip() or result.stdout.strip()}")
    return f"installed and started {LABEL} ({plist_path()}); logs in {logs_dir()}"


def uninstall() -> str:
    result = _launchctl("bootout", f"{_domain()}/{LABEL}")
    existed = plist_path().exists()
    plist_path().unlink(missing_ok=True)
    note = "" if result is not None else "; launchctl is not available on this system"
    return (f"removed {plist_path()}" if existed else f"{plist_path()} was not installed") + note


def status() -> str:
    result = _launchctl("print", f"{_domain()}/{LABEL}")
    installed = "installed" if plist_path().exists() else "not installed"
    if result is None:
        return f"{plist_path()}: {installed}; launchctl is not available on this system"
    if result.returncode != 0:
        return f"{plist_path()}: {installed}; not loaded in launchd"
    return result.stdout
