"""The suite draws the same hypothesis cases on every run (tests/conftest.py's profile)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

DRAWN: list[int] = []


@pytest.mark.skipif(os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci", reason="an exploring profile was asked for")
def test_ci_profile_is_derandomized_and_keeps_no_database() -> None:
    assert settings().derandomize and settings().database is None


@settings(max_examples=5)
@given(st.integers(0, 10**9))
def _draw(x: int) -> None:
    DRAWN.append(x)


@pytest.mark.skipif(os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci", reason="an exploring profile was asked for")
def test_two_runs_draw_the_same_cases() -> None:
    DRAWN.clear()
    _draw()
    first = list(DRAWN)
    DRAWN.clear()
    _draw()
    assert first == DRAWN and len(first) == 5
