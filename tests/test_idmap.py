"""The range table: parsing of every accepted form, every refusal, both
directions, boundaries, and agreement with a brute-force reference."""

import grp
import os
import pwd
import random

import pytest

from shiftfs.idmap import (ID_MAX, Extent, IdTable, TableError, build_idmap, parse_bindfs_pairs,
                           parse_extent, parse_extents, parse_map_spec, parse_proc_map, read_overflow_id,
                           subid_extents, subid_ranges)


# ---- parsing ----

def test_extent_fields_in_uid_map_order():
    assert parse_extent("0:100000:65536") == Extent(lower=0, upper=100000, count=65536)


def test_extent_without_count_is_refused_with_both_readings_shown():
    # '0:100000' as one id would leave every other id frozen without a word
    with pytest.raises(TableError) as exc:
        parse_extent("1000:0")
    message = str(exc.value)
    assert "'1000:0'" in message and "COUNT missing" in message
    assert "1000:0:65536" in message and "1000:0:1" in message and "--map 1000/0" in message


@pytest.mark.parametrize("text, extents", [
    ("0:100000:65536", [Extent(0, 100000, 65536)]),
    (" 0:100000:1000  1000:1000:1 ", [Extent(0, 100000, 1000), Extent(1000, 1000, 1)]),
    ("0:100000:1000+1000:1000:1;1001:5:2",
     [Extent(0, 100000, 1000), Extent(1000, 1000, 1), Extent(1001, 5, 2)]),
])
def test_several_extents_in_one_string(text, extents):
    assert parse_extents(text) == extents


@pytest.mark.parametrize("text", ["", "   ", "0:100000:65536 5"])
def test_bad_extent_strings_are_refused(text):
    with pytest.raises(TableError):
        parse_extents(text)


@pytest.mark.parametrize("text, needle", [
    ("0:100000:0", "count must be at least 1"),
    ("-1:100000:10", "not a non-negative number"),
    ("0:-5:10", "not a non-negative number"),
    ("a:100000:10", "not a non-negative number"),
    ("0:100000:x", "not a non-negative number"),
    ("0:100000:10:5", "expected LOWER:UPPER:COUNT"),
    ("0", "expected LOWER:UPPER:COUNT"),
    ("", "expected LOWER:UPPER:COUNT"),
    ("4294967295:0:1", "ends past 4294967294"),
    ("0:4294967295:1", "ends past 4294967294"),
    ("4294967290:0:10", "ends past 4294967294"),
    ("0:4294967200:1000", "ends past 4294967294"),
    ("1.5:0:1", "not a non-negative number"),
])
def test_bad_extents_are_refused_with_the_extent_named(text, needle):
    with pytest.raises(TableError) as exc:
        parse_extent(text)
    assert needle in str(exc.value)
    assert f"'{text}'" in str(exc.value)


def test_last_valid_id_is_accepted_in_both_columns():
    e = parse_extent(f"{ID_MAX}:{ID_MAX}:1")
    t = IdTable([e])
    assert t.to_upper(ID_MAX) == ID_MAX and t.to_lower(ID_MAX) == ID_MAX


def test_map_spec_prefixes_and_separators():
    uids, gids = parse_map_spec("u:0:1000:1, g:0:2000:1 b:1:100001:65535")
    assert uids == [Extent(0, 1000, 1), Extent(1, 100001, 65535)]
    assert gids == [Extent(0, 2000, 1), Extent(1, 100001, 65535)]


@pytest.mark.parametrize("spec, needle", [
    ("", "empty map"),
    ("x:0:1:1", "expected a u:, g: or b: prefix"),
    ("0:1:1", "expected a u:, g: or b: prefix"),
    ("b:0:1:1,", "stray separator"),
    ("b:0:1:0", "count must be at least 1"),
])
def test_map_spec_refusals(spec, needle):
    with pytest.raises(TableError) as exc:
        parse_map_spec(spec)
    assert needle in str(exc.value)


def test_bindfs_pairs_numbers_and_names():
    root_name = pwd.getpwuid(0).pw_name
    root_group = grp.getgrgid(0).gr_name
    uids, gids = parse_bindfs_pairs(f"1000/0:@1000/@0:{root_name}/5:@{root_group}/@6")
    assert uids == [Extent(1000, 0, 1), Extent(0, 5, 1)]
    assert gids == [Extent(1000, 0, 1), Extent(0, 6, 1)]


@pytest.mark.parametrize("spec, needle", [
    ("1000", "expected FROM/TO"),
    ("1000/@0", "both sides must be users or both groups"),
    ("no-such-user-xyz/0", "unknown user 'no-such-user-xyz'"),
    ("@no-such-group-xyz/@0", "unknown group 'no-such-group-xyz'"),
    ("4294967295/0", "past 4294967294"),
    ("", "empty map"),
])
def test_bindfs_pair_refusals(spec, needle):
    with pytest.raises(TableError) as exc:
        parse_bindfs_pairs(spec)
    assert needle in str(exc.value)


def test_proc_map_reads_inside_outside_count():
    assert parse_proc_map("         0     100000      65536\n") == [Extent(0, 100000, 65536)]
    with pytest.raises(TableError):
        parse_proc_map("0 100000\n")


def test_own_proc_map_parses():
    with open("/proc/self/uid_map") as f:
        extents = parse_proc_map(f.read())
    assert IdTable(extents).to_upper(os.getuid()) is not None


def test_subid_layout_puts_the_user_at_lower_zero():
    text = "alice:100000:65536\nbob:200000:1000\n1001:300000:10\n# comment\n"
    assert subid_ranges(text, "alice", 1000) == [(100000, 65536)]
    assert subid_ranges(text, "carol", 1001) == [(300000, 10)]
    assert subid_extents(1000, [(100000, 65536), (500000, 5)]) == [
        Extent(0, 1000, 1), Extent(1, 100000, 65536), Extent(65537, 500000, 5)]


# ---- the table ----

@pytest.mark.parametrize("extents, needle", [
    ([Extent(0, 100, 10), Extent(5, 200, 10)], "overlap on the lower side"),
    ([Extent(0, 100, 10), Extent(50, 105, 10)], "overlap on the upper side"),
    ([Extent(10, 100, 10), Extent(0, 95, 10)], "overlap on the upper side"),
    ([Extent(0, 0, 1), Extent(0, 0, 1)], "overlap on the lower side"),
])
def test_overlapping_extents_are_refused_naming_both(extents, needle):
    with pytest.raises(TableError) as exc:
        IdTable(extents)
    assert needle in str(exc.value)
    assert str(extents[0]) in str(exc.value) and str(extents[1]) in str(exc.value)


def test_adjacent_extents_are_fine():
    t = IdTable([Extent(0, 100, 10), Extent(10, 110, 10)])
    assert t.to_upper(9) == 109 and t.to_upper(10) == 110 and t.to_lower(119) == 19


def test_edges_of_an_extent():
    t = IdTable([Extent(1000, 5000, 10)])
    assert t.to_upper(999) is None
    assert t.to_upper(1000) == 5000
    assert t.to_upper(1009) == 5009
    assert t.to_upper(1010) is None
    assert t.to_lower(4999) is None
    assert t.to_lower(5000) == 1000
    assert t.to_lower(5009) == 1009
    assert t.to_lower(5010) is None


def test_340_extents_and_more_are_supported():
    extents = [Extent(i * 10, 1_000_000 + i * 20, 10) for i in range(400)]
    t = IdTable(extents)
    assert len(t) == 400
    assert t.to_upper(3995) == 1_000_000 + 399 * 20 + 5
    assert t.to_lower(1_000_000 + 15) is None  # the gap between upper ranges


def _random_table(rng):
    """Disjoint extents on both sides, built by shuffling slots."""
    n = rng.randint(1, 12)
    size = rng.randint(1, 50)
    lower_slots = rng.sample(range(40), n)
    upper_slots = rng.sample(range(40), n)
    return [Extent(lo * 64 + rng.randint(0, 10), up * 64 + rng.randint(0, 10), rng.randint(1, size))
            for lo, up in zip(lower_slots, upper_slots)]


def test_lookups_agree_with_brute_force_over_random_tables():
    rng = random.Random(1234)
    for _ in range(200):
        extents = _random_table(rng)
        table = IdTable(rng.sample(extents, len(extents)))  # insertion order must not matter
        ref_up = {e.lower + i: e.upper + i for e in extents for i in range(e.count)}
        ref_down = {v: k for k, v in ref_up.items()}
        for probe in range(0, 40 * 64 + 64):
            assert table.to_upper(probe) == ref_up.get(probe)
            assert table.to_lower(probe) == ref_down.get(probe)


def test_round_trip_both_ways():
    rng = random.Random(99)
    for _ in range(100):
        table = IdTable(_random_table(rng))
        for e in table.extents:
            for i in (0, e.count - 1, e.count // 2):
                assert table.to_lower(table.to_upper(e.lower + i)) == e.lower + i
                assert table.to_upper(table.to_lower(e.upper + i)) == e.upper + i


def test_memo_is_bounded_and_stays_correct():
    t = IdTable([Extent(0, 100000, 65536)])
    for i in range(70000):
        assert t.to_upper(i) == (100000 + i if i < 65536 else None)
    assert len(t._to_upper_cache) <= 65536


# ---- the mount's map ----

def test_unmapped_lower_ids_show_as_the_kernel_overflow_ids():
    m = build_idmap([Extent(0, 100000, 10)], [Extent(0, 200000, 10)])
    assert m.uid_to_upper(70000) == read_overflow_id("uid")
    assert m.gid_to_upper(70000) == read_overflow_id("gid")
    assert m.uid_to_upper(3) == 100003 and m.gid_to_upper(3) == 200003


def test_missing_gid_table_copies_the_uid_table_and_vice_versa():
    m = build_idmap([Extent(0, 100000, 65536)], [])
    assert m.gids.extents == [Extent(0, 100000, 65536)]
    m = build_idmap([], [Extent(5, 6, 1)])
    assert m.uids.extents == [Extent(5, 6, 1)]


def test_no_table_at_all_is_refused():
    with pytest.raises(TableError, match="no mapping given"):
        build_idmap([], [])


def test_table_error_says_which_table():
    with pytest.raises(TableError, match="^gid table: extents"):
        build_idmap([Extent(0, 1, 1)], [Extent(0, 1, 5), Extent(2, 10, 1)])
