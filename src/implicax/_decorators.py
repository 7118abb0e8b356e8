"""jaxopt-style decorators: `custom_root` and `custom_fixed_point` make any solver function
differentiable by the implicit function theorem.

The decorated ``solver(init_params, *args, **kwargs)`` runs as written, never differentiated
(it may be a loop, a library call or a host callback); its solution then enters
`root_solve` / `fixed_point_solve` as the starting point of a solver that returns it
unchanged, so the derivatives, the failure report and every transform are those of the
core entry points.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._failure import FailurePolicy
from ._forward import CallableSolver
from ._solve import fixed_point_solve, root_solve
from ._tree import check_floating


def _solution_as_is(fn, x0, params):
    """The forward solver of a decorated solve: its x0 is already the solution."""
    del fn, params
    return x0


def _decorator(
    kind: str,
    entry: Callable,
    equation_name: str,
    equation: Callable,
    has_aux,
    solve,
    reference_signature,
    on_failure,
    name,
) -> Callable:
    if not callable(equation):
        raise TypeError(f"{kind}: {equation_name} must be callable, got {equation!r}.")
    if not isinstance(has_aux, bool):
        raise TypeError(f"{kind}: has_aux must be True or False, got {has_aux!r}.")
    reference = reference_signature if reference_signature is not None else equation
    signature = reference if isinstance(reference, inspect.Signature) else _signature(reference)

    def decorate(solver: Callable) -> Callable:
        if not callable(solver):
            raise TypeError(f"{kind}(...) decorates a solver function, got {solver!r}.")

        @functools.wraps(solver)
        def wrapped(init_params, *args, **kwargs):
            bound = _bind(kind, signature, args, kwargs)
            # The solver runs on inputs that carry no derivative: it is never differentiated.
            out = solver(*_no_derivative((init_params, *args)), **_no_derivative(kwargs))
            if has_aux:
                if not (isinstance(out, tuple | list) and len(out) == 2):
                    raise TypeError(
                        f"{kind}(..., has_aux=True): the solver must return (solution, aux), "
                        f"got {type(out).__name__}."
                    )
                solution, aux = out
            else:
                solution, aux = out, None
            solution = _checked_solution(kind, solution)

            def fn(x, params):
                bound_args, bound_kwargs = params
                return equation(x, *bound_args, **bound_kwargs)

            try:
                x = entry(
                    fn,
                    lax.stop_gradient(solution),
                    bound,
                    solver=CallableSolver(_solution_as_is),
                    linear_solver=solve,
                    on_failure=on_failure,
                    name=name or getattr(solver, "__name__", None),
                )
            except (TypeError, ValueError) as error:  # name what the user wrote
                message = str(error)
                if "fn(x, params)" not in message:
                    raise
                message = re.sub(r"fn\(x, params\)( \(the residual\))?", equation_name, message)
                call = f"{equation_name}(solution, *args, **kwargs)"
                raise type(error)(
                    f"{kind}: {message.replace('x0', 'the solution')} (it is called as {call}.)"
                ) from None
            return (x, lax.stop_gradient(aux)) if has_aux else x

        return wrapped

    return decorate


def _checked_solution(kind: str, solution: Any) -> Any:
    """The solver's solution as a pytree of floating-point arrays, or a clear error."""
    try:
        solution = jax.tree.map(jnp.asarray, solution)
    except TypeError:
        raise TypeError(
            f"{kind}: the solver must return the solution as a pytree of floating-point "
            f"arrays, got {type(solution).__name__}: {solution!r:.80}."
        ) from None
    if not jax.tree.leaves(solution):
        raise ValueError(f"{kind}: the solver returned an empty solution ({solution!r}).")
    check_floating(solution, f"{kind}: the solver's solution")
    return solution


def _no_derivative(tree: Any) -> Any:
    """tree with its arrays (and numbers) cut from differentiation; other leaves as they are."""

    def cut(leaf):
        return lax.stop_gradient(leaf) if isinstance(leaf, jax.Array | float | complex) else leaf

    return jax.tree.map(cut, tree)


def _signature(function: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):  # a builtin or C function: calls go through as given
        return None


def _bind(kind: str, signature, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """(args, kwargs) matched to the reference signature (the equation's, by default), as
    jaxopt does: keyword arguments given by position there go by position."""
    if signature is None:
        return args, kwargs
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError as error:
        raise TypeError(
            f"{kind}: the solver's arguments do not fit the reference signature "
            f"{signature} (the equation's unless reference_signature is given): {error}."
        ) from None
    return bound.args[1:], bound.kwargs


def custom_root(
    optimality_fun: Callable,
    has_aux: bool = False,
    solve: Any = None,
    reference_signature: Any = None,
    *,
    on_failure: FailurePolicy | Mapping[str, FailurePolicy] = "warn",
    name: str | None = None,
) -> Callable:
    """Decorator: make ``solver(init_params, *args, **kwargs)`` differentiable in args and
    kwargs through ``optimality_fun(solution, *args, **kwargs) = 0`` (jaxopt's contract).

    The solver runs as written and is never differentiated; there is no derivative with
    respect to ``init_params``. The derivatives are `root_solve`'s: forward and reverse mode,
    every order, under jit, vmap and pmap, the failure policy (the solution is checked to
    make optimality_fun ≈ 0, and reported as ``on_failure`` says when it does not).

    Args:
        optimality_fun: ``optimality_fun(x, *args, **kwargs)``, zero at the solution and
            returning a pytree like it (e.g. ``jax.grad(objective)``).
        has_aux: the solver returns ``(solution, aux)``; the decorated function then returns
            the same pair, aux as the solver gave it (not differentiated).
        solve: the linear solver of the derivative's systems: an implicax linear solver or a
            callable ``solve(matvec, b) -> x`` (jaxopt's ``solve_cg`` and the like work);
            None for `root_solve`'s default.
        reference_signature: the signature (or a function with it) that args and kwargs are
            matched to before calling optimality_fun; by default optimality_fun's own.
        on_failure, name: as for `root_solve`.
    """
    return _decorator(
        "custom_root",
        root_solve,
        "optimality_fun",
        optimality_fun,
        has_aux,
        solve,
        reference_signature,
        on_failure,
        name,
    )


def custom_fixed_point(
    fixed_point_fun: Callable,
    has_aux: bool = False,
    solve: Any = None,
    reference_signature: Any = None,
    *,
    on_failure: FailurePolicy | Mapping[str, FailurePolicy] = "warn",
    name: str | None = None,
) -> Callable:
    """Decorator: make ``solver(init_params, *args, **kwargs)`` differentiable through the
    fixed-point equation ``solution = fixed_point_fun(solution, *args, **kwargs)``; otherwise
    as `custom_root` (the derivatives are `fixed_point_solve`'s)."""
    return _decorator(
        "custom_fixed_point",
        fixed_point_solve,
        "fixed_point_fun",
        fixed_point_fun,
        has_aux,
        solve,
        reference_signature,
        on_failure,
        name,
    )
