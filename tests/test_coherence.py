"""A lower tree shared by several mounts (the main use case) or changed
directly is never shown stale for longer than the documented bound: the
attribute and entry timeouts (1 s by default)."""

import os
import time

import pytest

from tests.daemon import seen_within
from tests.tables import ROOT_KEPT

pytestmark = pytest.mark.needs_root

BOUND = 1.0  # the default attr_timeout = entry_timeout = negative_timeout


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


# ---- watched: fanotify turns changes behind the mount into invalidations ------

WATCH_LIMIT = 5.0  # polled; the kernel caches for an hour in this mode


@pytest.fixture
def watched(lower, mounter):
    (lower / "f").write_text("one")
    (lower / "d").mkdir()
    (lower / "d" / "old").write_text("o")
    a = mounter(lower, uidmap=ROOT_KEPT, options=["-o", "cache=watch"])
    b = mounter(lower, uidmap=ROOT_KEPT, options=["-o", "cache=watch"])
    for mp in (a, b):  # warm: every name below is cached for an hour now
        os.stat(mp / "f")
        assert (mp / "f").read_text() == "one"
        assert not os.path.exists(mp / "new")
        assert sorted(os.listdir(mp / "d")) == ["old"]
    return a, b


def test_watched_direct_lower_changes_show_at_once(lower, watched):
    a, _b = watched
    os.chmod(lower / "f", 0o600)
    assert seen_within(lambda: (os.stat(a / "f").st_mode & 0o777) == 0o600, WATCH_LIMIT) is not None
    (lower / "new").write_text("n")  # a cached negative entry
    assert seen_within(lambda: os.path.exists(a / "new"), WATCH_LIMIT) is not None
    os.rename(lower / "d" / "old", lower / "d" / "renamed")
    assert seen_within(lambda: sorted(os.listdir(a / "d")) == ["renamed"], WATCH_LIMIT) is not None
    # the old name within the same bound (its expiry is a notification of its own)
    assert seen_within(lambda: not os.path.exists(a / "d" / "old"), WATCH_LIMIT) is not None
    os.unlink(lower / "f")
    assert seen_within(lambda: not os.path.exists(a / "f"), WATCH_LIMIT) is not None


def test_watched_directory_attribute_changes_show_at_once(lower, watched):
    """A directory's own change (chmod, chown) comes from fanotify as the
    directory with the name "."; the root's too."""
    a, b = watched
    for mp in (a, b):
        os.stat(mp / "d")
        os.stat(mp)
    os.chmod(lower / "d", 0o700)
    assert seen_within(lambda: (os.stat(a / "d").st_mode & 0o777) == 0o700, WATCH_LIMIT) is not None
    os.chown(b / "d", 100007, 100008)  # through the other mount
    assert seen_within(lambda: os.stat(a / "d").st_uid == 100007, WATCH_LIMIT) is not None
    before = os.stat(lower).st_mode
    os.chmod(lower, 0o711)
    try:
        assert seen_within(lambda: (os.stat(a).st_mode & 0o777) == 0o711, WATCH_LIMIT) is not None
    finally:
        os.chmod(lower, before)


def test_watched_write_through_another_mount_shows_at_once(watched):
    a, b = watched
    with open(b / "f", "w") as f:
        f.write("two, longer")
    assert seen_within(lambda: (a / "f").read_text() == "two, longer", WATCH_LIMIT) is not None
    os.chown(b / "f", 100005, 100006)
    assert seen_within(lambda: os.stat(a / "f").st_uid == 100005, WATCH_LIMIT) is not None


def test_cache_timeout_mode_relies_on_the_timeouts(lower, mounter):
    """-o cache=timeout: no watcher, so with a long timeout a change behind
    the mount stays unseen (the reason the default is to watch)."""
    (lower / "f").write_text("one")
    a = mounter(lower, uidmap=ROOT_KEPT, options=["-o", "cache=timeout,timeout=60"])
    os.stat(a / "f")
    os.chmod(lower / "f", 0o600)
    time.sleep(1.0)
    assert os.stat(a / "f").st_mode & 0o777 == 0o644


def test_cache_forever_keeps_what_it_saw(lower, mounter):
    """-o cache=forever: nothing watched, a day-long lifetime; meant for a
    lower nothing else changes, so a change behind the mount stays unseen."""
    (lower / "f").write_text("one")
    a = mounter(lower, uidmap=ROOT_KEPT, options=["-o", "cache=forever"])
    os.stat(a / "f")
    assert not os.path.exists(a / "new")
    os.chmod(lower / "f", 0o600)
    (lower / "new").write_text("n")
    time.sleep(1.5)  # past the 1 s default
    assert os.stat(a / "f").st_mode & 0o777 == 0o644 and not os.path.exists(a / "new")


def test_watched_changes_show_at_once_after_a_server_restart(lower, watched):
    """A restarted server's nodes come from the journal without a fid
    (only the directories and open files are indexed again); ext4's are
    found by their number, and must still be matched to the event's
    handle: a file's change behind the mount shows as before the restart."""
    from tests.daemon import restart_server

    a, _b = watched
    (lower / "d" / "g").write_text("g")
    os.stat(a / "d" / "g")
    restart_server(a)
    time.sleep(0.2)  # the new server has expired every name once
    for name in ("f", "d/g"):
        os.stat(a / name)  # looked up again: the journal's nodes, cached for an hour
        assert (a / name).read_text()
    os.chmod(lower / "f", 0o600)
    assert seen_within(lambda: (os.stat(a / "f").st_mode & 0o777) == 0o600, WATCH_LIMIT) is not None
    with open(lower / "d" / "g", "a") as f:
        f.write(" and more")
    assert seen_within(lambda: (a / "d" / "g").read_text() == "g and more", WATCH_LIMIT) is not None
