"""Suite-wide settings: hypothesis draws the same cases on every run unless asked to explore.

`HYPOTHESIS_PROFILE=explore python -m pytest ...` opts into random search (more examples, a
local example database); the default profile `ci` is derandomized (cases derive from each
test's source) and keeps no database, so two runs of the suite test the same inputs.
"""

from __future__ import annotations

import os

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
