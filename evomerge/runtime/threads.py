"""One knob for every thread pool a process computes with: torch's and the BLAS/OpenMP pools numpy uses.

Limiting torch alone is not enough: numpy's OpenBLAS starts one thread per core for products as
small as M2N2's 21 × 1,437 fitness pass, and on a busy 2-core machine those threads made a digits
search 3× slower.
"""

from __future__ import annotations

import torch
from threadpoolctl import threadpool_limits


def limit_threads(threads: int) -> None:
    """At most `threads` compute threads per pool in this process; 0 leaves every library's default."""
    if threads:
        torch.set_num_threads(threads)
        threadpool_limits(limits=threads)
