"""The step clock on its own: positions, modes, and when the cache counts as ready."""

import pytest
import torch
from torch import nn

import cachequant as cq
from cachequant.runtime.clock import StepClock


def _clock(full=(0, 3)):
    return StepClock(nn.Linear(2, 2), [5.0, 4.0, 3.0, 2.0, 1.0], full)


def test_a_run_reuses_only_what_a_full_call_of_the_same_run_stored():
    clock = _clock()
    clock.start_run()
    assert (clock.position, clock.mode, clock.tentative) == (0, "full", True)
    clock.called = True  # what the denoiser hook does on a call
    clock.advance()
    assert (clock.position, clock.mode, int(clock.step_tensor())) == (1, "cached", 1)
    clock.advance()
    clock.advance()
    assert (clock.position, clock.mode) == (3, "full")
    clock.advance(5)  # past the last position: the run is over
    assert not clock.running


def test_a_run_starting_at_a_cached_position_runs_it_in_full():
    clock = _clock()
    clock.start_run()
    clock.set(2)  # e.g. image-to-image placed the run here
    assert (clock.mode, clock.forced) == ("full", True)
    clock.called = True
    clock.advance()
    assert (clock.position, clock.mode, clock.forced) == (3, "full", False)


def test_driving_directly_a_backward_position_starts_a_new_run():
    clock = _clock()
    clock.set(0)
    clock.called = True
    clock.set(1)
    assert clock.mode == "cached"
    clock.called = True
    clock.set(1)  # the same position again: a new run, nothing of the last one reused
    assert clock.mode == "full"


def test_positions_outside_the_plan_are_refused():
    clock = StepClock(nn.Linear(2, 2), [3.0, 2.0, 1.0], [1], begin=1)
    with pytest.raises(cq.PlanMismatchError, match="start at position 1"):
        clock.set(0)
    with pytest.raises(cq.PlanMismatchError, match="outside the plan's 3 model calls"):
        clock.set(3)
    assert clock.find(torch.tensor([2.0, 2.0])) == 1 and clock.find(7) is None


def test_calls_within_a_step_are_numbered_and_counted():
    """Guidance as separate calls: the branches of a step, and a count other than the plan's refused
    (more calls at the call, fewer when the sampler leaves the position)."""
    clock = StepClock(nn.Linear(2, 2), [5.0, 4.0, 3.0], [0], calls_per_step=2)
    clock.start_run()
    branches = []
    for _ in range(2):
        clock.check_call(5.0)
        clock.begin_call()
        branches.append(clock.branch)
    assert branches == [0, 1]
    with pytest.raises(cq.PlanMismatchError, match="called 3 times at sampler position 0"):
        clock.check_call(5.0)
    clock.advance()
    assert (clock.position, clock.mode, clock.branch) == (1, "cached", 0)
    clock.check_call(4.0)
    clock.begin_call()
    with pytest.raises(cq.PlanMismatchError, match="2 model calls per scheduler step.* 1 time"):
        clock.advance()
