"""Error bounds for dot products that stay meaningful when the sum cancels."""

from __future__ import annotations

import numpy as np


def assert_dot_close(got, want, x, w, tol: float, what: str = "") -> None:
    """Assert ``|got - want| <= tol * (|x| @ |w|.T)`` elementwise.

    ``x`` is (M, K) and ``w`` (N, K). The bound scales with the sum of the magnitudes of the
    products, so a near-zero output of large terms is judged by the rounding those terms
    allow, not by a relative error that explodes when the sum cancels.
    """
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bound = tol * (np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64)).T)
    excess = np.abs(got - want) - bound
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else None
    assert excess.size == 0 or excess.max() <= 1e-30, (
        f"{what}: |got - want| exceeds {tol} * sum|x*w| at {worst}: "
        f"got {got[worst]}, want {want[worst]}, bound {bound[worst]}"
    )
