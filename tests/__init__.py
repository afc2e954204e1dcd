"""The test suite, a package: its helpers (tests.callers, tests.daemon, tests.tables, ...)
are imported by their full names, from the tests and from bench/."""
