"""The structs shiftfs lays out itself match the installed libfuse's C
header (libfuse3-dev, installed by .ci/setup): sizes, and the offset of
every fuse_lowlevel_ops slot shiftfs fills."""

from __future__ import annotations

import ctypes
import json
import subprocess
import tempfile
from pathlib import Path

from shiftfs import fuse

_PROGRAM = r"""
#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
int main(void) {
    struct fuse_file_info fi;
    unsigned int bits;
    memset(&fi, 0, sizeof(fi));
    fi.keep_cache = 1;
    memcpy(&bits, (char *)&fi + 4, 4);
    printf("{\"fi_fh\": %zu, \"fi_keep_cache_bits\": %u,", offsetof(struct fuse_file_info, fh), bits);
    printf("\"version\": [%d, %d],", FUSE_MAJOR_VERSION, FUSE_MINOR_VERSION);
    printf("\"fuse_buf\": %zu, \"fuse_bufvec\": %zu, \"fuse_entry_param\": %zu,",
           sizeof(struct fuse_buf), sizeof(struct fuse_bufvec), sizeof(struct fuse_entry_param));
    printf("\"fuse_ctx\": %zu, \"fuse_forget_data\": %zu, \"fuse_args\": %zu,",
           sizeof(struct fuse_ctx), sizeof(struct fuse_forget_data), sizeof(struct fuse_args));
    printf("\"fuse_file_info\": %zu, \"fuse_conn_info\": %zu, \"stat\": %zu,",
           sizeof(struct fuse_file_info), sizeof(struct fuse_conn_info), sizeof(struct stat));
#if FUSE_MAJOR_VERSION * 100 + FUSE_MINOR_VERSION >= 317
    printf("\"fi_backing_id\": %zu, \"cap_passthrough\": %llu,",
           offsetof(struct fuse_file_info, backing_id), (unsigned long long)FUSE_CAP_PASSTHROUGH);
#endif
    printf("\"ops\": {");
    OFFSETS
    printf("\"_end\": 0}}");
    return 0;
}
"""


def _c_layout() -> dict:
    names = [name for name, _kind in fuse._OPS]
    offsets = "\n".join(f'printf("\\"{n}\\": %zu,", offsetof(struct fuse_lowlevel_ops, {n}));'
                        for n in names)
    cflags = subprocess.run(["pkg-config", "--cflags", "fuse3"], capture_output=True, text=True,
                            check=True).stdout.split()
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "layout.c", Path(d) / "layout"
        src.write_text(_PROGRAM.replace("OFFSETS", offsets))
        subprocess.run(["gcc", *cflags, "-o", str(exe), str(src)], check=True)
        return json.loads(subprocess.run([str(exe)], capture_output=True, text=True,
                                         check=True).stdout)


def test_the_header_is_the_loaded_library():
    assert tuple(_c_layout()["version"]) == fuse.LIBFUSE_VERSION


def test_struct_sizes_match_the_c_header():
    """Structs shiftfs allocates itself (or libfuse copies whole) have the
    header's size."""
    c = _c_layout()
    ours = {
        "fuse_buf": fuse.FuseBuf, "fuse_bufvec": fuse.FuseBufvec,
        "fuse_entry_param": fuse.EntryParam, "fuse_ctx": fuse.Ctx,
        "fuse_forget_data": fuse.ForgetData, "fuse_args": fuse.Args,
        "fuse_conn_info": fuse.ConnInfo, "stat": fuse.c_stat,
    }
    assert {k: ctypes.sizeof(v) for k, v in ours.items()} == {k: c[k] for k in ours}
    for name, size in fuse.LAYOUT_SIZES.items():
        assert c[name] == size, name


def test_file_info_fields_shiftfs_uses_are_where_the_header_puts_them():
    """fuse_file_info is only ever read and written through libfuse's own
    pointer (3.17's header has 64 bytes, mfusepy's struct the first 40):
    fh and the keep_cache bit must sit where C has them."""
    c = _c_layout()
    assert fuse.FileInfo.fh.offset == c["fi_fh"]
    fi = fuse.FileInfo()
    fi.keep_cache = 1
    assert int.from_bytes(bytes(fi)[4:8], "little") == c["fi_keep_cache_bits"]
    assert ctypes.sizeof(fuse.FileInfo) <= c["fuse_file_info"]


def test_passthrough_fields_are_where_the_header_puts_them():
    """libfuse 3.17: fuse_file_info.backing_id, written by offset (mfusepy's
    struct stops before it), and the capability bit; 3.14 has neither and
    shiftfs does not ask for passthrough there."""
    c = _c_layout()
    if fuse.LIBFUSE_VERSION >= (3, 17):
        assert fuse.HAS_PASSTHROUGH
        assert c["fi_backing_id"] == fuse.FI_BACKING_ID_OFFSET
        assert c["fi_backing_id"] + 4 <= c["fuse_file_info"]
        assert c["cap_passthrough"] == fuse.FUSE_CAP_PASSTHROUGH
    else:
        assert not fuse.HAS_PASSTHROUGH and "fi_backing_id" not in c


def test_every_lowlevel_ops_slot_is_where_the_header_puts_it():
    c = _c_layout()["ops"]
    for name, _kind in fuse._OPS:
        assert getattr(fuse.LowlevelOps, name).offset == c[name], name
