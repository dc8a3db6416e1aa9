"""The driver loop and the executors that evaluate candidates."""

from evomerge.runtime.driver import resume_run, start_run
from evomerge.runtime.executor import InProcessExecutor, Outcome
from evomerge.runtime.manager import SearchManager

__all__ = ["InProcessExecutor", "Outcome", "SearchManager", "resume_run", "start_run"]
