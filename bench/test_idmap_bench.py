"""pytest-benchmark: IdTable lookups, the cost every getattr pays twice.

Tables of 1 extent (the common container case), 3 extents (a typical
/etc/subuid-derived map) and 340 extents (the kernel's uid_map limit), in
both directions:

- hit:  a mapped id asked again (the memoised path every getattr takes);
- miss: an unmapped id asked again (memoised too: shown as the overflow id);
- cold: a fresh table per round, so the first lookup bisects the extents
  (what a mount pays once per distinct id).

Run: ``python3 -m pytest bench/test_idmap_bench.py --benchmark-only`` (from the repository root)
"""

import pytest

from shiftfs.idmap import Extent, IdTable


def extents(n):
    """n disjoint extents of 1000 ids, lower i*1000.., upper 100000 + i*2000.."""
    return [Extent(i * 1000, 100000 + i * 2000, 1000) for i in range(n)]


SIZES = [1, 3, 340]


def probe(n):
    """(lower, upper) of a mapped id in the last extent, and ids mapped on neither side."""
    last = n - 1
    return last * 1000 + 7, 100000 + last * 2000 + 7


@pytest.mark.parametrize("n", SIZES)
def test_to_upper_hit(benchmark, n):
    table = IdTable(extents(n))
    lower, upper = probe(n)
    table.to_upper(lower)
    assert benchmark(table.to_upper, lower) == upper


@pytest.mark.parametrize("n", SIZES)
def test_to_lower_hit(benchmark, n):
    table = IdTable(extents(n))
    lower, upper = probe(n)
    table.to_lower(upper)
    assert benchmark(table.to_lower, upper) == lower


@pytest.mark.parametrize("n", SIZES)
def test_to_upper_miss(benchmark, n):
    table = IdTable(extents(n))
    unmapped = n * 1000 + 5  # past the last lower extent
    assert benchmark(table.to_upper, unmapped) is None


@pytest.mark.parametrize("n", SIZES)
def test_to_lower_miss(benchmark, n):
    table = IdTable(extents(n))
    unmapped = 100000 + 1500  # in the gap between the first two upper extents (or past the only one)
    assert benchmark(table.to_lower, unmapped) is None


def _cold(direction, n):
    ext = extents(n)
    lower, upper = probe(n)
    arg, want = (lower, upper) if direction == "to_upper" else (upper, lower)

    def setup():
        # a fresh table each round: nothing memoised, the lookup bisects
        return (getattr(IdTable(ext), direction), arg), {}

    return setup, want


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("direction", ["to_upper", "to_lower"])
def test_cold(benchmark, n, direction):
    setup, want = _cold(direction, n)
    result = benchmark.pedantic(lambda fn, x: fn(x), setup=setup,
                                rounds=200 if n < 340 else 50, iterations=1)
    assert result == want


@pytest.mark.parametrize("n", SIZES)
def test_cold_many_ids(benchmark, n):
    """1,000 distinct ids spread over the table, first ask each: the bisection
    cost without memo hits (a fresh table per round)."""
    ext = extents(n)
    ids = [(i * 997) % (n * 1000) for i in range(1000)]

    def setup():
        return (IdTable(ext),), {}

    def run(table):
        up = table.to_upper
        for i in ids:
            up(i)

    benchmark.pedantic(run, setup=setup, rounds=20 if n < 340 else 10, iterations=1)
