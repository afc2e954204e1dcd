"""The wire structs shiftfs packs itself (protocol.py) match the installed
kernel header (linux/fuse.h, from linux-libc-dev): every struct's size,
and the offsets of the fields newer kernels added in what older headers
call padding (backing_id, flags2, max_stack_depth)."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

from shiftfs import protocol as P

HEADER = Path("/usr/include/linux/fuse.h")


def _c_layout(names: list[str]) -> dict:
    sizes = "\n".join(f'printf("\\"{n}\\": %zu,", sizeof(struct {n}));' for n in names)
    program = f"""
#include <linux/fuse.h>
#include <stddef.h>
#include <stdio.h>
int main(void) {{
    printf("{{");
    {sizes}
    printf("\\"minor\\": %d,", FUSE_KERNEL_MINOR_VERSION);
    printf("\\"init_out_flags2\\": %zu,", offsetof(struct fuse_init_out, flags2));
    printf("\\"init_out_after_flags2\\": %zu,", offsetof(struct fuse_init_out, flags2) + 4);
    printf("\\"open_out_after_flags\\": %zu}}", offsetof(struct fuse_open_out, open_flags) + 4);
    return 0;
}}
"""
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "layout.c", Path(d) / "layout"
        src.write_text(program)
        subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
        return json.loads(subprocess.run([str(exe)], capture_output=True, text=True,
                                         check=True).stdout)


def test_struct_sizes_match_the_kernel_header():
    c = _c_layout(sorted(P.SIZES))
    assert {n: c[n] for n in P.SIZES} == P.SIZES


def test_fields_newer_kernels_added_sit_where_the_header_has_padding():
    c = _c_layout([])
    # fuse_open_out: fh, open_flags, then backing_id (7.40; "padding" before)
    assert c["open_out_after_flags"] == P.OPEN_OUT.pack(0, 0, -2).index(bytes.fromhex("feffffff"))
    # fuse_init_out: flags2 at 32, then max_stack_depth (7.40; unused[0] before)
    packed = P.INIT_OUT.pack(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0xAABBCCDD, 0x11223344, 0)
    assert c["init_out_flags2"] == packed.index(bytes.fromhex("ddccbbaa")) == 32
    assert c["init_out_after_flags2"] == packed.index(bytes.fromhex("44332211"))


def test_opcodes_and_flags_match_the_header():
    text = HEADER.read_text()
    opcodes = {n: int(v) for n, v in re.findall(r"\bFUSE_([A-Z0-9_]+)\s*=\s*(\d+),", text)}
    served = [n for n in opcodes if n.lower() in P.NAMES.values()]
    assert len(served) >= 40
    for name in served:
        assert getattr(P, name) == opcodes[name], name
    bits = {n: 1 << int(shift) for n, shift in re.findall(
        r"#define\s+FUSE_([A-Z0-9_]+)\s+\(1(?:ULL)?\s*<<\s*(\d+)\)", text)}
    checked = 0
    for name in ("ASYNC_READ", "DONT_MASK", "DO_READDIRPLUS", "POSIX_ACL", "HANDLE_KILLPRIV_V2",
                 "INIT_EXT", "PARALLEL_DIROPS", "CACHE_SYMLINKS", "AUTO_INVAL_DATA", "MAX_PAGES",
                 "HAS_EXPIRE_ONLY", "PASSTHROUGH", "EXPIRE_ONLY", "WRITE_KILL_SUIDGID",
                 "GETATTR_FH", "HAS_IOCTL_DIR", "DIRECT_IO_ALLOW_MMAP"):
        if name in bits:  # the Debian 12 header (7.38) lacks the newest
            assert getattr(P, name) == bits[name], name
            checked += 1
    assert checked >= 14
    minor = int(re.search(r"FUSE_KERNEL_MINOR_VERSION\s+(\d+)", text).group(1))
    assert P.KERNEL_MINOR >= minor
