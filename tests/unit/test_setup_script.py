"""scripts/setup names each Debian package it installs once (prometheus ships both tools)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup"


def test_setup_installs_prometheus_once_when_both_tools_are_missing(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "id"):  # what the script needs before it installs anything
        (bin_dir / tool).symlink_to(shutil.which(tool))
    calls = tmp_path / "apt-calls"
    apt = bin_dir / "apt-get"  # records what it is asked, and fails: the script stops there
    apt.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit 1\n')
    apt.chmod(0o755)
    (bin_dir / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "sudo").chmod(0o755)
    res = subprocess.run(
        [shutil.which("bash"), str(SETUP)], env={"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=30
    )
    assert res.returncode != 0  # apt-get failed on purpose
    line = next(x for x in res.stderr.splitlines() if "installing Debian packages" in x)
    assert line.split(":", 2)[2].split().count("prometheus") == 1, line
    assert calls.read_text().splitlines()[0] == "update -qq"
