"""Path resolution below the lower root, with openat2 and with the
per-component fallback: both refuse a symlink anywhere in the parent path."""

import errno
import os

import pytest

from shiftfs import fuse
from shiftfs.idmap import Extent, build_idmap
from shiftfs.ops import ShiftOperations


@pytest.fixture(params=[True, False], ids=["openat2", "walk"])
def ops(request, tmp_path, monkeypatch):
    if request.param and not fuse.HAS_OPENAT2:
        pytest.fail("openat2 is expected on the kernels CI runs on")
    monkeypatch.setattr(fuse, "HAS_OPENAT2", request.param)
    lower = tmp_path / "lower"
    (lower / "a" / "b").mkdir(parents=True)
    (lower / "a" / "b" / "f").write_text("inside")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "f").write_text("outside")
    os.symlink(tmp_path / "outside", lower / "abs")
    os.symlink("../../outside", lower / "a" / "rel")
    o = ShiftOperations(str(lower), build_idmap([Extent(0, 100000, 65536)], []))
    yield o
    os.close(o.root)


def test_plain_paths_resolve(ops):
    st, uid, _gid = ops.getattr(b"/a/b/f", None)
    assert st.st_size == len("inside") and uid == 100000 + os.getuid()


@pytest.mark.parametrize("path", [b"/abs/f", b"/a/rel/f"])
def test_a_symlink_in_the_parent_path_is_enotdir(ops, path):
    with pytest.raises(OSError) as exc:
        ops.getattr(path, None)
    assert exc.value.errno == errno.ENOTDIR


def test_the_last_component_is_not_followed(ops):
    st, _uid, _gid = ops.getattr(b"/abs", None)
    assert os.path.stat.S_ISLNK(st.st_mode)
