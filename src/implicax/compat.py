"""Compatibility with fax (fixed-point JAX).

`two_phase_solve` keeps fax's curried signature, so fax code runs with only the import changed::

    from implicax.compat import two_phase_solve   # was: from fax.implicit import two_phase_solve
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ._krylov import Neumann
from ._solve import fixed_point_solve
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
    if not callable(param_func):
        raise TypeError(
            "two_phase_solve: param_func must be callable as param_func(params) -> (x -> x), "
            f"got {param_func!r}."
        )
    solvers = _check_solvers(solvers)
    if solvers:
        first = solvers[0]
        solver: Any = lambda fn, x0, p: first(x0, p)
    else:
        solver = FixedPointIteration(max_steps=5000)

    def fn(x, p):
        step = param_func(p)
        if not callable(step):
            got = "an array" if hasattr(step, "dtype") else type(step).__name__
            raise TypeError(
                f"two_phase_solve: param_func(params) must return a callable x -> x, got {got}."
            )
        return step(x)

    return fixed_point_solve(
        fn,
        init_xs,
        params,
        solver=solver,
        linear_solver=Neumann(max_steps=5000),
    )


def _check_solvers(solvers: Any) -> tuple:
    message = "two_phase_solve: solvers must be a sequence of callables solver(init_x, params) -> x"
    if callable(solvers):
        raise TypeError(f"{message}, got one callable {solvers!r}; pass [solver].")
    if isinstance(solvers, (str, bytes)):
        raise TypeError(f"{message}, got {solvers!r}.")
    try:
        solvers = tuple(solvers)
    except TypeError:
        raise TypeError(f"{message}, got {solvers!r}.") from None
    for i, entry in enumerate(solvers):
        if not callable(entry):
            raise TypeError(f"{message}; solvers[{i}] is {entry!r}.")
    return solvers
