"""man/shiftfs.1: renders without warnings and documents every option."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from shiftfs import cli, scan

MAN = Path(__file__).resolve().parent.parent / "man" / "shiftfs.1"


def rendered() -> str:
    r = subprocess.run(["groff", "-man", "-Tutf8", "-rHY=0", "-rLL=400n", "-P-c", "-P-b", "-P-u", str(MAN)],
                       capture_output=True, text=True, check=True)
    return re.sub(r"\s+", " ", r.stdout.replace("\u2010", "-").replace("\u2011", "-")
                  .replace("\u2212", "-").replace("\u00ad", ""))


def test_groff_has_no_warnings():
    assert shutil.which("groff"), "groff missing: install groff (listed in .ci/packages.txt)"
    r = subprocess.run(["groff", "-man", "-ww", "-z", str(MAN)], capture_output=True, text=True)
    assert r.returncode == 0
    assert r.stderr == "" and r.stdout == ""


def test_man_renders_without_warnings():
    if not shutil.which("man"):
        pytest.fail("man missing: install man-db (listed in .ci/packages.txt)")
    r = subprocess.run(["man", "-l", str(MAN)], capture_output=True, text=True,
                       env={"MANWIDTH": "80", "MAN_KEEP_STDERR": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stderr == ""
    assert "SYNOPSIS" in r.stdout


def option_strings(parser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def test_every_command_line_option_is_documented():
    text = rendered()
    options = option_strings(cli.build_parser()) | option_strings(scan.build_parser())
    missing = sorted(o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text))
    assert missing == []


def test_every_o_option_is_documented():
    text = rendered()
    words = (cli.IGNORED_OPTIONS | cli.KERNEL_FLAGS
             | {"uidmap=", "gidmap=", "map=", "bindfs-map=", "userns=", "subuid=", "ro", "suid",
                "dev", "allow_suid", "allow_dev", "debug", "attr_timeout=", "entry_timeout=",
                "negative_timeout=", "timeout="})
    words -= {"x-systemd"}  # covered by x-*
    missing = sorted(w for w in words if not re.search(rf"(?<![\w-]){re.escape(w)}", text))
    assert missing == []
    assert "x-*" in text


@pytest.mark.parametrize("section", ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "SAFETY",
                                     "EXIT STATUS", "FILES", "DIFFERENCES FROM KERNEL IDMAPPED MOUNTS",
                                     "SEE ALSO", "EXAMPLES", "SCAN", "FSTAB AND MOUNT", "SUPERVISOR"])
def test_sections(section):
    assert re.search(rf"^\.SH \"?{section}\"?$", MAN.read_text(), re.M)


def test_exit_statuses_match_the_code():
    text = rendered()
    assert cli.EXIT_USAGE == 2 and scan.EXIT_FAILED == 1 and scan.EXIT_FROZEN == 3
    for status in ("0", "1", "2", "3"):
        assert re.search(rf"EXIT STATUS .*?\b{status} ", text)


def test_see_also():
    text = rendered()
    for ref in ("bindfs(1)", "fuse-overlayfs(1)", "mount_setattr(2)", "mount.fuse3(8)"):
        assert ref in text.split("SEE ALSO")[-1]


def test_installed_with_the_package():
    pyproject = (MAN.parent.parent / "pyproject.toml").read_text()
    assert re.search(r'"share/man/man1"\s*=\s*\["man/shiftfs.1"\]', pyproject)
