"""The driver's thread limits and its account of where a run's wall time went."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from evomerge.runtime import start_run
from evomerge.runtime.threads import limit_threads
from evomerge.spec import load_spec
from tests.conftest import tiny_spec, write_spec


def test_limit_threads_caps_torch_and_numpys_blas():
    torch_before = torch.get_num_threads()
    try:
        with threadpool_limits(limits=None):  # puts the BLAS pools back as they were on exit
            limit_threads(1)
            assert torch.get_num_threads() == 1
            pools = threadpool_info()
            assert pools, "numpy links a BLAS that threadpoolctl should see"
            assert all(pool["num_threads"] == 1 for pool in pools)
    finally:
        torch.set_num_threads(torch_before)


def test_default_runtime_is_one_thread(tmp_path: Path):
    spec = tiny_spec(tmp_path)
    spec.pop("runtime")
    assert load_spec(write_spec(tmp_path / "s.yaml", spec)).runtime.threads == 1


def test_summary_splits_wall_time_between_evaluator_strategy_tests_and_driver(tmp_path: Path):
    torch_before = torch.get_num_threads()
    try:
        with threadpool_limits(limits=None):
            run = start_run(load_spec(write_spec(tmp_path / "s.yaml", tiny_spec(tmp_path, budget=300))), progress=False)
    finally:
        torch.set_num_threads(torch_before)
    summary = json.loads(run.summary_path.read_text())
    shares = [summary[k] for k in ("evaluator_share", "strategy_share", "test_share", "overhead_share")]
    assert all(share >= 0 for share in shares)
    assert summary["strategy_share"] > 0  # 300 asks and tells of M2N2 take measurable time
    assert sum(shares) == pytest.approx(1.0, abs=2e-4)
