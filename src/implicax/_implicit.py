"""The implicit function theorem as a JAX derivative rule.

For x*(θ) defined by F(x*, θ) = 0, differentiating gives  ∂F/∂x · ẋ = −∂F/∂θ · θ̇.
`_solve` is a `jax.custom_jvp` whose rule returns the solution (by calling `_solve` itself, so
the rule is differentiable again) and ẋ from a `lax.custom_linear_solve` of that system. JAX
transposes the linear solve for reverse mode (the adjoint system (∂F/∂x)ᵀλ = x̄) and
differentiates the rule again for higher orders, so every composition of jvp, vjp, grad,
jacfwd, jacrev and hessian works, with the chosen linear solver at every order.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
from jax import lax

from ._config import FailurePolicy, SolveStats, apply_failure_policy, check_policy
from ._linear import BiCGStab, _LinearSolver, as_linear_solver
from ._misc import PyTree, check_floating, make_varying, max_abs, varying_axes
from ._solvers import FixedPointIteration, Newton, Problem, _ForwardSolver


@dataclasses.dataclass(frozen=True, eq=False)
class _Spec:
    """Everything about a solve that is not an array: the non-differentiable argument."""

    function: Callable  # function(x, params, *consts), closure-converted
    fixed_point: bool
    solver: Any
    linear_solver: _LinearSolver
    on_failure: FailurePolicy

    def problem(self, params, consts) -> Problem:
        return Problem(lambda x: self.function(x, params, *consts), self.fixed_point)

    def forward(self, x0, params, consts) -> tuple[PyTree, SolveStats]:
        problem = self.problem(params, consts)
        if isinstance(self.solver, _ForwardSolver):
            x, stats = self.solver.solve(problem, x0)
        else:
            x = self.solver(lambda x, p: self.function(x, p, *consts), x0, params)
            _check_like(x, x0, "the solver's output", "x0")
            residual_norm = max_abs(problem.residual(x))
            stats = SolveStats(
                jnp.asarray(-1, jnp.int32), residual_norm, jnp.isfinite(residual_norm)
            )
        # A non-finite solution never counts as converged, even where the residual is zero
        # there: a callable solver may "solve" tanh(x) = 1 with x = inf.
        return x, stats._replace(converged=stats.converged & jnp.isfinite(max_abs(x)))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _solve(spec: _Spec, x0, params, consts):
    x, stats = spec.forward(x0, params, consts)
    x, stats = apply_failure_policy(x, stats, spec.on_failure, "forward solve")
    return x, _pack(stats)


# The statistics leave the custom_jvp as one float vector with a zero tangent: integer and
# boolean outputs would need float0 tangents, which cannot be marked varying inside shard_map.
def _pack(stats: SolveStats) -> jax.Array:
    dtype = stats.residual_norm.dtype
    return jnp.stack(
        [stats.steps.astype(dtype), stats.residual_norm, stats.converged.astype(dtype)]
    )


def _unpack(packed: jax.Array) -> SolveStats:
    return SolveStats(packed[0].astype(jnp.int32), packed[1], packed[2] > 0)


@_solve.defjvp
def _solve_jvp(spec: _Spec, primals, tangents):
    x0, params, consts = primals
    _, params_dot, consts_dot = tangents
    x, stats = _solve(spec, x0, params, consts)

    def residual(x, params, consts):
        return spec.problem(params, consts).residual(x)

    # ∂F/∂θ·θ̇ (θ = params and the closed-over arrays), then solve ∂F/∂x·ẋ = −∂F/∂θ·θ̇.
    _, rhs = jax.jvp(lambda p, c: residual(x, p, c), (params, consts), (params_dot, consts_dot))
    _, jacobian_vector_product = jax.linearize(lambda y: residual(y, params, consts), x)
    x_dot = lax.custom_linear_solve(
        jacobian_vector_product,
        jax.tree.map(jnp.negative, rhs),
        solve=_reporting(spec, "tangent linear solve"),
        transpose_solve=_reporting(spec, "adjoint linear solve"),
        symmetric=spec.linear_solver.symmetric,
    )
    return (x, stats), (x_dot, jnp.zeros_like(stats))


def _reporting(spec: _Spec, what: str):
    def solve(matvec, b):
        x, stats = spec.linear_solver.solve(matvec, b)
        return apply_failure_policy(x, stats, spec.on_failure, what)[0]

    return solve


def _check_like(out: PyTree, like: PyTree, out_name: str, like_name: str) -> None:
    """Raise a TypeError naming the first difference in structure, shape or dtype."""
    out_def, like_def = jax.tree.structure(out), jax.tree.structure(like)
    if out_def != like_def:
        raise TypeError(
            f"{out_name} must have the same pytree structure as {like_name}; "
            f"got {out_def}, expected {like_def}."
        )
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out), jax.tree.leaves(like)):
        where = jax.tree_util.keystr(path) or "(root)"
        if jnp.shape(a) != jnp.shape(b):
            raise TypeError(
                f"{out_name} must have the shapes of {like_name}; at {where} got shape "
                f"{jnp.shape(a)}, expected {jnp.shape(b)}."
            )
        if jnp.result_type(a) != jnp.result_type(b):
            raise TypeError(
                f"{out_name} must have the dtypes of {like_name}; at {where} got "
                f"{jnp.result_type(a)}, expected {jnp.result_type(b)}."
            )


def _closure_convert(fn, x0, params):
    """fn as ``function(x, params, *consts)``, with every array fn closes over made an argument.

    The custom_jvp rule must see closed-over arrays as inputs to differentiate with respect to
    them. `jax.closure_convert` hoists only values that can carry a tangent: integer arrays and
    PRNG keys closed over inside an outer `jit` would stay in the function as stale tracers and
    leak when that `jit` is differentiated, so all constants of fn's jaxpr are hoisted here.
    """
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(x0, params)
    out_tree = jax.tree.structure(out_shape)

    def function(x, params, *consts):
        out = jax.core.eval_jaxpr(closed.jaxpr, list(consts), *jax.tree.leaves((x, params)))
        return jax.tree.unflatten(out_tree, out)

    return function, list(closed.consts)


def _check_x0(x0: PyTree) -> PyTree:
    x0 = jax.tree.map(jnp.asarray, x0)
    if not jax.tree.leaves(x0):
        raise ValueError("x0 must contain at least one array; got an empty pytree.")
    check_floating(x0, "x0")
    return x0


def _implicit_solve(
    fn, x0, params, *, fixed_point, solver, linear_solver, on_failure, return_stats, default_solver
):
    entry = "fixed_point_solve" if fixed_point else "root_solve"
    if not callable(fn):
        raise TypeError(f"{entry}: fn must be callable as fn(x, params), got {fn!r}.")
    if solver is None:
        solver = default_solver
    elif not callable(solver) and not isinstance(solver, _ForwardSolver):
        raise TypeError(
            f"{entry}: solver must be an implicax solver (FixedPointIteration, Anderson, Broyden, "
            f"Newton) or a callable solver(fn, x0, params) -> x, got {solver!r}."
        )
    linear_solver = as_linear_solver(BiCGStab() if linear_solver is None else linear_solver)
    check_policy(on_failure)
    x0 = _check_x0(x0)
    out = jax.eval_shape(fn, x0, params)
    what = "fn(x, params)" + ("" if fixed_point else " (the residual)")
    _check_like(out, x0, what, "x0")
    # Inside shard_map, fn(x0, params) may vary over more mesh axes than x0 (per-device params,
    # replicated x0). Give x0 the output's type up front so the loop carry keeps one type and the
    # closure-converted fn is traced for the type it will be called with.
    x0 = jax.tree.map(lambda a, o: make_varying(a, varying_axes(o)), x0, out)
    function, consts = _closure_convert(fn, x0, params)
    spec = _Spec(function, fixed_point, solver, linear_solver, on_failure)
    x, stats = _solve(spec, lax.stop_gradient(x0), params, consts)
    return (x, _unpack(lax.stop_gradient(stats))) if return_stats else x


def root_solve(
    fn: Callable[[PyTree, PyTree], PyTree],
    x0: PyTree,
    params: PyTree = None,
    *,
    solver: _ForwardSolver | Callable | None = None,
    linear_solver: _LinearSolver | Callable | None = None,
    on_failure: FailurePolicy = "warn",
    return_stats: bool = False,
) -> PyTree | tuple[PyTree, SolveStats]:
    """Solve fn(x, params) = 0 for x, differentiably in params (and in arrays fn closes over).

    The derivative follows from the implicit function theorem: with F = fn and x* the
    solution, ∂F/∂x·ẋ = −∂F/∂θ·θ̇, solved by `linear_solver` without forming ∂F/∂x (reverse mode
    solves the transposed system). It is exact at the solution whatever the forward solver did,
    zero with respect to x0, and available to any order in forward and reverse mode.

    Args:
        fn: the residual, ``fn(x, params)``, returning a pytree with the structure, shapes and
            dtypes of x.
        x0: initial guess (pytree of floating arrays); the solution keeps its dtypes.
        params: any pytree of arrays that fn depends on.
        solver: forward solver: `Newton` (default), `Broyden`, `Anderson`,
            `FixedPointIteration`, or any callable ``solver(fn, x0, params) -> x`` (never
            differentiated, so it may be a host callback).
        linear_solver: for the tangent and adjoint systems: `BiCGStab` (default), `GMRES`,
            `CG` (only if ∂F/∂x is symmetric positive definite), `Neumann`, `Dense`, or any
            callable ``linear_solver(matvec, b) -> x`` on pytrees.
        on_failure: when a forward or linear solve does not converge: ``"warn"`` (default; a
            RuntimeWarning from a host callback, the result is returned as is), ``"nan"`` (NaN
            solution or derivative, per batch element under vmap), ``"raise"`` (an error from
            inside jit; under vmap one failure fails the whole batch) or ``"ignore"``.
        return_stats: also return the forward solve's `SolveStats`.

    Returns:
        x with fn(x, params) ≈ 0, or ``(x, stats)`` when return_stats is True.
    """
    return _implicit_solve(
        fn,
        x0,
        params,
        fixed_point=False,
        solver=solver,
        linear_solver=linear_solver,
        on_failure=on_failure,
        return_stats=return_stats,
        default_solver=Newton(),
    )


def fixed_point_solve(
    fn: Callable[[PyTree, PyTree], PyTree],
    x0: PyTree,
    params: PyTree = None,
    *,
    solver: _ForwardSolver | Callable | None = None,
    linear_solver: _LinearSolver | Callable | None = None,
    on_failure: FailurePolicy = "warn",
    return_stats: bool = False,
) -> PyTree | tuple[PyTree, SolveStats]:
    """Solve x = fn(x, params) for x, differentiably in params (and in arrays fn closes over).

    The derivative is that of the root of F(x) = x − fn(x, params):
    (I − ∂fn/∂x)·ẋ = ∂fn/∂θ·θ̇, and in reverse mode λ(I − ∂fn/∂x) = x̄, solved by
    `linear_solver` from the solution alone (no backpropagation through the iterations).

    Args:
        fn: the map, ``fn(x, params)``, returning a pytree like x.
        x0: initial guess; the solution keeps its structure and dtypes.
        params: any pytree of arrays that fn depends on.
        solver: `FixedPointIteration` (default), `Anderson`, `Broyden`, `Newton`, or any
            callable ``solver(fn, x0, params) -> x``.
        linear_solver: `BiCGStab` (default), `GMRES`, `Neumann` (fax's two-phase adjoint
            iteration; needs a contraction), `Dense`, `CG` (only for symmetric I − ∂fn/∂x),
            or any callable ``linear_solver(matvec, b) -> x``.
        on_failure: ``"warn"`` (default), ``"nan"``, ``"raise"`` or ``"ignore"``; see
            `root_solve`.
        return_stats: also return the forward solve's `SolveStats`.

    Returns:
        x with x ≈ fn(x, params), or ``(x, stats)`` when return_stats is True.
    """
    return _implicit_solve(
        fn,
        x0,
        params,
        fixed_point=True,
        solver=solver,
        linear_solver=linear_solver,
        on_failure=on_failure,
        return_stats=return_stats,
        default_solver=FixedPointIteration(),
    )
