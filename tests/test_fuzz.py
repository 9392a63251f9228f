"""Bounded property-based fuzzing of the readers (issue 11); the long campaign is benchmarks/fuzz.py.

Derandomised, so CI runs the same cases every time; a few seconds per target.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_cases import TARGETS, run_case

torch.set_num_threads(1)
CI = settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    return {name: t.make(tmp_path_factory.mktemp(name)) for name, t in TARGETS.items()}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_mutated_inputs_are_accepted_and_round_trip_or_refused_with_the_tools_error(name, pristine):
    outcomes: list[str] = []

    @CI
    @given(data=st.data())
    def case(data):
        with tempfile.TemporaryDirectory() as work:
            outcomes.append(run_case(TARGETS[name], data, pristine[name], Path(work)))

    case()
    assert len(outcomes) >= 20
    assert any(o != "accepted" for o in outcomes), "no mutation was refused: the fuzzer is not reaching the checks"
