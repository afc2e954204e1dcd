"""The README's first command: the demo mounts, writes as a mapped user, unmounts."""

import re
import subprocess
import sys

import pytest

from shiftfs.mount import mounts

pytestmark = pytest.mark.needs_root


def test_demo_shows_shifted_ids_and_where_a_write_landed():
    out = subprocess.run([sys.executable, "-m", "shiftfs.demo"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^-rw-r--r-- +1 +65534 +65534 .* stray$", out.stdout, re.M)
    assert re.search(r"^-rw-r--r-- +1 +101000 +101000 +3 .* hello$", out.stdout, re.M)
    assert re.search(r"^-rw-r--r-- +1 +1000 +1000 +3 .* hello$", out.stdout, re.M)
    assert not [mp for _s, mp, _t in mounts() if "shiftfs-demo-" in mp]
