"""`python -m behalf.cli` (used to start real processes in tests)."""

from behalf.cli import entry_point

entry_point()
