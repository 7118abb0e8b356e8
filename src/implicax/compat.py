"""Compatibility with fax (fixed-point JAX).

`two_phase_solve` and `root_solve` keep fax's signatures and solver contracts, so fax code runs
with only the import changed::

    from implicax.compat import two_phase_solve   # was: from fax.implicit import two_phase_solve
    from implicax.compat import root_solve        # was: from fax.implicit import root_solve
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ._forward import CallableSolver
from ._krylov import GMRES, Neumann
from ._linear import CallableLinearSolver
from ._solve import fixed_point_solve
from ._solve import root_solve as _root_solve
from ._solvers import FixedPointIteration
from ._tree import least_precise_dtype, tree_add, tree_sub

__all__ = ["root_solve", "two_phase_solve"]


def two_phase_solve(
    param_func: Callable[[Any], Callable[[Any], Any]],
    init_xs: Any,
    params: Any,
    solvers: Sequence[Callable | None] = (),
) -> Any:
    """fax's ``two_phase_solve``: the fixed point of ``param_func(params)``, differentiable in params.

    Deprecated: use ``implicax.fixed_point_solve(lambda x, p: param_func(p)(x), init_xs, params)``,
    which also gives forward-mode and higher-order derivatives with a free choice of solvers.

    As in fax, the forward solve is fixed-point iteration and the backward solve is
    Christianson's two-phase (Neumann) iteration, up to 5000 steps each. `solvers` follows
    fax's contract: each entry is called as ``solver(param_func, init_x, params) -> x`` and
    ``None`` means the default. ``solvers[0]`` solves the fixed point; ``solvers[1]`` each
    derivative's fixed point, d = Jᵀd + c in reverse mode and d = J·d + c in forward mode,
    called as ``solvers[1](param_func, c, c)`` with ``param_func(c)(d) = J·d + c`` (fax packs
    its params differently; a solver that only passes them to param_func works unchanged).
    implicax differentiates its derivative rule again for higher orders, with the same linear
    solve, so ``solvers[1]`` serves every order; later entries are accepted and not used.
    A solver's result is checked against a tolerance of sqrt(eps) of the dtype, and a failure
    is reported (a warning) like any implicax solve's.

    Returns:
        x with ``param_func(params)(x) == x``.
    """
    _deprecated(
        "two_phase_solve", "fixed_point_solve(lambda x, p: param_func(p)(x), init_xs, params)"
    )
    if not callable(param_func):
        raise TypeError(
            "two_phase_solve: param_func must be callable as param_func(params) -> (x -> x), "
            f"got {param_func!r}."
        )
    solvers = _check_solvers(solvers)
    forward = solvers[0] if solvers else None
    backward = solvers[1] if len(solvers) > 1 else None

    def fn(x, p):
        step = param_func(p)
        if not callable(step):
            got = "an array" if hasattr(step, "dtype") else type(step).__name__
            raise TypeError(
                f"two_phase_solve: param_func(params) must return a callable x -> x, got {got}."
            )
        return step(x)

    solver: Any = FixedPointIteration(max_steps=5000)
    if forward is not None and _positional_arity(forward) == 2:
        # Earlier implicax.compat called solvers[0](init_x, params); fax passes param_func.
        warnings.warn(
            "two_phase_solve: a solver called as solver(init_x, params) is deprecated; fax's "
            "contract is solver(param_func, init_x, params).",
            DeprecationWarning,
            stacklevel=2,
        )
        solver = _fax_solver(lambda fn, x0, p: forward(x0, p), init_xs)
    elif forward is not None:
        solver = _fax_solver(
            lambda fn, x0, p: forward(lambda q: lambda x: fn(x, q), x0, p), init_xs
        )
    linear_solver: Any = Neumann(max_steps=5000)
    if backward is not None:
        linear_solver = functools.partial(_as_fixed_point, backward)
    return fixed_point_solve(fn, init_xs, params, solver=solver, linear_solver=linear_solver)


def root_solve(
    func: Callable[[Any, Any], Any],
    init_xs: Any,
    params: Any,
    solver: Callable[[Any, Any], Any],
    rev_solver: Callable | None = None,
) -> Any:
    """fax's ``root_solve``: the root of ``func(x, params)`` found by ``solver``, differentiable
    in params.

    Deprecated: use ``implicax.root_solve(func, init_xs, params, solver=...)``.

    As in fax, ``solver(init_xs, params) -> x`` finds the root (it is never differentiated),
    and ``rev_solver(matvec, b) -> (x, info)``, like `jax.scipy.sparse.linalg.gmres` (the
    default, here implicax's `GMRES`), solves the derivative's linear systems: the transposed
    one in reverse mode (as in fax), the Jacobian's own in forward mode, at every order.
    The root and rev_solver's solutions are checked against a tolerance of sqrt(eps) of the
    dtype, and a failure is reported (a warning) like any implicax solve's.

    Returns:
        x with ``func(x, params) == 0``.
    """
    _deprecated("root_solve", "root_solve(func, init_xs, params, solver=...)")
    if not callable(solver):
        raise TypeError(
            f"root_solve: solver must be callable as solver(init_xs, params), got {solver!r}."
        )
    linear_solver: Any = GMRES()
    if rev_solver is not None:
        linear_solver = CallableLinearSolver(
            lambda matvec, b: rev_solver(matvec, b)[0], rtol=_fax_tolerance(init_xs)
        )
    return _root_solve(
        func,
        init_xs,
        params,
        solver=_fax_solver(lambda fn, x0, p: solver(x0, p), init_xs),
        linear_solver=linear_solver,
    )


def _fax_solver(function: Callable, init_xs: Any) -> CallableSolver:
    """A fax solver, its result checked at `_fax_tolerance`."""
    return CallableSolver(function, rtol=_fax_tolerance(init_xs))


def _fax_tolerance(init_xs: Any) -> float:
    """sqrt(eps) of the dtype (float64: 1.5e-8): fax's solvers stop on a small step (its
    default: 1e-10 relative and absolute), which leaves a residual above implicax's default
    tolerance but far below a failed solve's."""
    dtype = least_precise_dtype(jax.tree.map(jnp.asarray, init_xs))
    return float(jnp.finfo(dtype).eps) ** 0.5


def _as_fixed_point(fax_solver: Callable, matvec: Callable, b: Any) -> Any:
    """A·v = b (A = I − J, or its transpose) as fax poses it: the fixed point of
    v ↦ v − A·v + b, found by a fax solver called as ``solver(param_func, b, b)``."""
    return fax_solver(lambda c: lambda v: tree_add(tree_sub(v, matvec(v)), c), b, b)


def _positional_arity(function: Callable) -> int | None:
    """How many positional arguments `function` takes (None if unknown or variadic)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = [p.kind for p in parameters]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(kind in positional for kind in kinds)


def _deprecated(name: str, replacement: str) -> None:
    warnings.warn(
        f"implicax.compat.{name} is deprecated; use implicax.{replacement} instead.",
        DeprecationWarning,
        stacklevel=3,
    )


def _check_solvers(solvers: Any) -> tuple:
    message = (
        "two_phase_solve: solvers must be a sequence of callables "
        "solver(param_func, init_x, params) -> x (or None for the default)"
    )
    if callable(solvers):
        raise TypeError(f"{message}, got one callable {solvers!r}; pass [solver].")
    if isinstance(solvers, (str, bytes)):
        raise TypeError(f"{message}, got {solvers!r}.")
    try:
        solvers = tuple(solvers)
    except TypeError:
        raise TypeError(f"{message}, got {solvers!r}.") from None
    for i, entry in enumerate(solvers):
        if entry is not None and not callable(entry):
            raise TypeError(f"{message}; solvers[{i}] is {entry!r}.")
    return solvers
