"""Run directories: lock, journal, atomic snapshots, summaries."""

from evomerge.store.atomic import NoSpaceError
from evomerge.store.journal import Journal, decode_scores, encode_scores, iter_journal, read_journal
from evomerge.store.rundir import RunDir, list_runs
from evomerge.store.snapshot import load_state, save_state

__all__ = [
    "Journal",
    "NoSpaceError",
    "RunDir",
    "decode_scores",
    "encode_scores",
    "iter_journal",
    "list_runs",
    "load_state",
    "read_journal",
    "save_state",
]
