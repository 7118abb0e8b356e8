"""Compatibility with fax (fixed-point JAX).

`two_phase_solve` keeps fax's curried signature, so fax code runs with only the import changed::

    from implicax.compat import two_phase_solve   # was: from fax.implicit import two_phase_solve
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ._implicit import fixed_point_solve
from ._linear import Neumann
from ._solvers import FixedPointIteration

__all__ = ["two_phase_solve"]


def two_phase_solve(
    param_func: Callable[[Any], Callable[[Any], Any]],
    init_xs: Any,
    params: Any,
    solvers: Sequence[Callable] = (),
) -> Any:
    """fax's ``two_phase_solve``: the fixed point of ``param_func(params)``, differentiable in params.

    Deprecated: use ``implicax.fixed_point_solve(lambda x, p: param_func(p)(x), init_xs, params)``,
    which also gives forward-mode and higher-order derivatives with a free choice of solvers.

    As in fax, the forward solve is fixed-point iteration and the backward solve is
    Christianson's two-phase (Neumann) iteration. `solvers`, if given, is fax's sequence of
    forward solvers ``solver(init_x, params) -> x``; its first entry replaces the forward solve.

    Returns:
        x with ``param_func(params)(x) == x``.
    """
    warnings.warn(
        "implicax.compat.two_phase_solve is deprecated; use implicax.fixed_point_solve("
        "lambda x, p: param_func(p)(x), init_xs, params) instead.",
        DeprecationWarning,
        stacklevel=2,
    )
    if solvers:
        first = solvers[0]
        solver: Any = lambda fn, x0, p: first(x0, p)
    else:
        solver = FixedPointIteration(max_steps=5000)
    return fixed_point_solve(
        lambda x, p: param_func(p)(x),
        init_xs,
        params,
        solver=solver,
        linear_solver=Neumann(max_steps=5000),
    )
