"""Suite-wide settings: hypothesis draws the same cases on every run unless asked to explore.

`HYPOTHESIS_PROFILE=explore python -m pytest ...` opts into random search (more examples, a
local example database); the default profile `ci` is derandomized (cases derive from each
test's source) and keeps no database, so two runs of the suite test the same inputs.

After each test module, JAX's compiled programs and trace caches are dropped: a worker that
kept every module's executables grew to 9.6 GB over the suite, and CI's 24 GiB machine
runs two workers beside torch's own models.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import jax
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs() -> Iterator[None]:
    """Frees a module's compiled programs once its tests are done (see the module docstring)."""
    yield
    jax.clear_caches()
    gc.collect()
