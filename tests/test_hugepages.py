"""Optimizer state in transparent huge pages (coupled_ds/hugepages.py): large CPU state tensors
are advised before first touch, loaded state is moved in place, nothing else changes."""

from __future__ import annotations

import copy
import mmap
import sys

import pytest
import torch

from coupled_ds import CoupledAdam, hugepages

pytestmark = pytest.mark.skipif(
    not (sys.platform == "linux" and hugepages.thp_mode() in ("always", "madvise")),
    reason="needs Linux with transparent huge pages set to always or madvise")

ROWS, COLS = 2048, 1024  # 8 MiB in float32: spans at least three aligned 2 MiB pages


def _mapping(address: int) -> dict[str, str]:
    """The /proc/self/smaps entry of the mapping that holds ``address``."""
    entry: dict[str, str] | None = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(x, 16) for x in head.split("-"))
                if entry is not None:
                    break
                if start <= address < end:
                    entry = {}
            elif entry is not None:
                key, _, value = line.partition(":")
                entry[key] = value.strip()
    assert entry is not None, f"no mapping holds {address:#x}"
    return entry


def _advised(tensor: torch.Tensor) -> bool:
    """Whether the middle of ``tensor`` lies in a mapping marked MADV_HUGEPAGE (VmFlags hg)."""
    middle = tensor.data_ptr() + tensor.numel() * tensor.element_size() // 2
    return "hg" in _mapping(middle)["VmFlags"].split()


def _in_huge_pages(tensor: torch.Tensor) -> bool:
    middle = tensor.data_ptr() + tensor.numel() * tensor.element_size() // 2
    return int(_mapping(middle)["AnonHugePages"].split()[0]) > 0


def _model_and_optimizer(**kw):
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.Parameter(torch.randn(ROWS, COLS, generator=gen))
    dense = torch.nn.Parameter(torch.randn(ROWS, COLS, generator=gen))
    bias = torch.nn.Parameter(torch.randn(COLS, generator=gen))
    opt = CoupledAdam([{"params": [emb], "coupled": True}, {"params": [dense, bias]}],
                      lr=1e-2, **kw)
    return (emb, dense, bias), opt


def _steps(params, opt, n=3):
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("compact", [False, True])
def test_state_advised_and_results_unchanged(monkeypatch, compact):
    params, opt = _model_and_optimizer(compact_coupled_state=compact)
    _steps(params, opt)
    emb, dense, bias = params
    large = [opt.state[emb]["exp_avg"], opt.state[dense]["exp_avg"],
             opt.state[dense]["exp_avg_sq"]]
    if not compact:
        large.append(opt.state[emb]["exp_avg_sq"])
    assert all(_advised(t) for t in large)
    assert not any(_advised(t) for t in opt.state[bias].values() if t.dim())  # 4 KiB: left alone

    # Negative control and reference: the same run with huge pages off gives no advised
    # mapping, and bit-identical parameters and state.
    monkeypatch.setenv("COUPLED_DS_HUGE_PAGES", "0")
    ref_params, ref_opt = _model_and_optimizer(compact_coupled_state=compact)
    _steps(ref_params, ref_opt)
    assert not any(_advised(ref_opt.state[p]["exp_avg"]) for p in ref_params[:2])
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, ref_opt.state[q][key]), key


def test_loaded_state_moves_into_huge_pages():
    params, opt = _model_and_optimizer()
    _steps(params, opt)
    saved = copy.deepcopy(opt.state_dict())
    # The dense matrix's v in a mapping of its own (as torch.load gives), in 4 KiB pages so far.
    value = saved["state"][1]["exp_avg_sq"]
    region = mmap.mmap(-1, value.numel() * value.element_size(),  # private, as malloc's
                       flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    loaded = torch.frombuffer(region, dtype=value.dtype).view(value.shape)
    loaded.copy_(value)
    saved["state"][1]["exp_avg_sq"] = loaded
    assert not _advised(loaded) and not _in_huge_pages(loaded)

    params2, opt2 = _model_and_optimizer()
    with torch.no_grad():
        for p, q in zip(params, params2):
            q.copy_(p)
    opt2.load_state_dict(saved)
    state = opt2.state[params2[1]]["exp_avg_sq"]
    assert state.data_ptr() == loaded.data_ptr()  # in place: the same tensor, same memory
    assert _advised(state) or _in_huge_pages(state)  # MADV_HUGEPAGE, or MADV_COLLAPSE done
    assert torch.equal(state, opt.state[params[1]]["exp_avg_sq"])
    _steps(params, opt, 1)
    _steps(params2, opt2, 1)
    assert torch.equal(params[1], params2[1]) and torch.equal(params[0], params2[0])


def test_only_large_plain_cpu_tensors():
    small = torch.ones(16, 16)
    strided = torch.ones(COLS, ROWS).t()
    assert not _advised(hugepages.zeros_like(small))
    out = hugepages.zeros_like(strided)
    assert out.stride() == strided.stride() and not out.any()
    assert hugepages.advise(small) is None and hugepages.advise(strided) is None
    half = hugepages.zeros_like(torch.ones(ROWS, COLS, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16 and _advised(half) and not half.any()
