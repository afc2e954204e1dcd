"""The benchmarks, a package: run each script from the repository root as a
module, e.g. ``python3 -m bench.run --quick``, ``python3 -m bench.chart``.
They import shiftfs and the test helpers (tests.daemon, tests.tables,
tests.procs, ...) as packages of the checkout, without touching sys.path."""
