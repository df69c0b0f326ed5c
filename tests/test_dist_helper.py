"""The spawn helper itself: results come back by rank, failures and hangs surface clearly."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tests.dist import RankFailure, run_on_ranks


def _sum_ranks(rank, world):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return rank, world, t.item()


def _rank1_raises(rank, world):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def _rank0_hangs(rank, world):
    if rank == 0:
        time.sleep(60)
    return rank


def test_results_come_back_in_rank_order():
    assert run_on_ranks(3, _sum_ranks) == [(0, 3, 3.0), (1, 3, 3.0), (2, 3, 3.0)]


def test_a_failing_rank_fails_the_run_with_its_traceback():
    with pytest.raises(RankFailure, match="rank 1 of 2 failed(.|\n)*boom on rank 1"):
        run_on_ranks(2, _rank1_raises)


def test_a_hanging_rank_times_out():
    with pytest.raises(RankFailure, match="timed out"):
        run_on_ranks(2, _rank0_hangs, timeout=8)
