"""A lower tree shared by several mounts (the main use case) or changed
directly is never shown stale for longer than the documented bound: the
attribute and entry timeouts (1 s by default)."""

import os
import time

import pytest

try:
    from tests.conftest import ROOT_KEPT
except ImportError:
    from conftest import ROOT_KEPT

pytestmark = pytest.mark.needs_root

BOUND = 1.0  # the default attr_timeout = entry_timeout = negative_timeout


def seen_within(check, limit):
    """Seconds until check() held, or None if it did not within limit."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if check():
            return time.monotonic() - start
        time.sleep(0.02)
    return None


@pytest.fixture
def two(lower, mounter):
    (lower / "f").write_text("one")
    a, b = mounter(lower, uidmap=ROOT_KEPT), mounter(lower, uidmap=ROOT_KEPT)
    # warm both caches, so staleness is possible at all
    for mp in (a, b):
        os.stat(mp / "f")
        assert (mp / "f").read_text() == "one"
    return a, b


def test_chown_through_one_mount_shows_in_the_other_within_the_bound(lower, two):
    a, b = two
    os.chown(a / "f", 100005, 100006)
    assert os.stat(lower / "f").st_uid == 5
    waited = seen_within(lambda: os.stat(b / "f").st_uid == 100005, BOUND + 1.0)
    assert waited is not None and waited <= BOUND + 0.5


def test_direct_lower_changes_show_within_the_bound(lower, two):
    a, _b = two
    os.chmod(lower / "f", 0o600)
    (lower / "new").write_text("n")
    assert seen_within(lambda: (os.stat(a / "f").st_mode & 0o777) == 0o600, BOUND + 1.0)
    assert seen_within(lambda: os.path.exists(a / "new"), BOUND + 1.0)  # negative entry expired


def test_content_written_through_one_mount_reads_back_in_the_other(two):
    a, b = two
    with open(a / "f", "w") as f:
        f.write("two, longer")
    # auto_cache: a new open compares mtime/size and drops stale pages
    assert seen_within(lambda: (b / "f").read_text() == "two, longer", BOUND + 1.0)


def test_removal_shows_within_the_bound(lower, two):
    _a, b = two
    os.unlink(lower / "f")
    assert seen_within(lambda: not os.path.exists(b / "f"), BOUND + 1.0)
