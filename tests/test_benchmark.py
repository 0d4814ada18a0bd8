"""benchmarks/train_step.py's timing loop: the settings take turns and the ratio is paired within a round."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_SPEC = importlib.util.spec_from_file_location(
    "train_step", Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py")
train_step = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(train_step)


def test_interleaved_takes_turns_and_pairs_each_call_with_the_baseline_of_its_round(monkeypatch):
    # seconds each call takes on a fake clock: one warm-up call, four timed rounds, one peak-memory call
    durations = {"fp": [9.0, 1.0, 2.0, 4.0, 8.0, 9.0], "kd": [9.0, 1.5, 2.2, 4.4, 20.0, 9.0]}
    clock = {"now": 0.0}
    order = []

    def step(name):
        def fn():
            order.append(name)
            clock["now"] += durations[name].pop(0)
        return fn

    monkeypatch.setattr(train_step.time, "perf_counter", lambda: clock["now"])
    res = train_step.interleaved({"fp": step("fp"), "kd": step("kd")}, n=4, device=torch.device("cpu"))
    assert order == ["fp", "kd"] + ["fp", "kd"] * 4 + ["fp", "kd"]
    # hand computed: medians fp (2 + 4) / 2 = 3, kd (2.2 + 4.4) / 2 = 3.3 (their ratio would be 1.1);
    # per round kd / fp = 1.5, 1.1, 1.1, 2.5 -> median 1.3
    assert res["fp"][:2] == pytest.approx((3.0, 1.0))
    assert res["kd"][:2] == pytest.approx((3.3, 1.3))
