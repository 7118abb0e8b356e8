"""The implicit function theorem as a JAX derivative rule.

For x*(θ) defined by F(x*, θ) = 0, differentiating gives  ∂F/∂x · ẋ = −∂F/∂θ · θ̇.
`_solve` is a `jax.custom_jvp` whose rule returns the solution (by calling `_solve` itself, so
the rule is differentiable again) and ẋ from a `lax.custom_linear_solve` of that system. JAX
transposes the linear solve for reverse mode (the adjoint system (∂F/∂x)ᵀλ = x̄, solved with
the transposed operator: no solver's symmetry is assumed) and differentiates the rule again for
higher orders, so every composition of jvp, vjp, grad, jacfwd, jacrev and hessian works, with
the chosen linear solver at every order.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._failure import FailurePolicy, SolveStats, apply_failure_policy
from ._forward import CallableSolver, Problem
from ._tree import PyTree, check_like, tree_scale


@dataclasses.dataclass(frozen=True, eq=False)
class Spec:
    """Everything about a solve that is not an array: the non-differentiable argument.

    The solvers' tolerances and step limits given as arrays travel beside the spec
    (`limits`), so that they may be traced; `solvers` puts them back with the others.
    """

    function: Callable  # function(x, params, *consts), closure-converted
    fixed_point: bool
    solvers: Any  # (treedef, constant leaves, which leaves are traced) of the two solvers
    on_failure: FailurePolicy

    def unflatten_solvers(self, limits) -> tuple[Any, Any]:
        treedef, constants, traced = self.solvers
        limits = iter(limits)
        leaves = [next(limits) if t else c for c, t in zip(constants, traced)]
        return treedef.unflatten(leaves)

    def problem(self, params, consts) -> Problem:
        return Problem(lambda x: self.function(x, params, *consts), self.fixed_point)

    def forward(self, limits, x0, params, consts) -> tuple[PyTree, SolveStats]:
        solver, _ = self.unflatten_solvers(limits)
        problem = self.problem(params, consts)
        if isinstance(solver, CallableSolver):
            x = solver.function(lambda x, p: self.function(x, p, *consts), x0, params)
            check_like(x, x0, "the solver's output", "x0")
            return x, solver.stats(problem, x)
        return solver.solve(problem, x0)

    def linear_solver(self, limits):
        return self.unflatten_solvers(limits)[1]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def solve(spec: Spec, limits, x0, params, consts):
    x, stats = spec.forward(limits, x0, params, consts)
    x, stats = apply_failure_policy(x, stats, spec.on_failure, "forward solve")
    return x, _pack(stats)


# The statistics leave the custom_jvp as one float vector with a zero tangent: integer and
# boolean outputs would need float0 tangents, which cannot be marked varying inside shard_map.
def _pack(stats: SolveStats) -> jax.Array:
    dtype = stats.residual_norm.dtype
    return jnp.stack([jnp.asarray(field).astype(dtype) for field in stats])


def unpack(packed: jax.Array) -> SolveStats:
    steps, residual_norm, converged, diverged, inner_failures = packed
    return SolveStats(
        steps.astype(jnp.int32),
        residual_norm,
        converged > 0,
        diverged > 0,
        inner_failures.astype(jnp.int32),
    )


@solve.defjvp
def _solve_jvp(spec: Spec, primals, tangents):
    limits, x0, params, consts = primals
    _, _, params_dot, consts_dot = tangents
    x, stats = solve(spec, limits, x0, params, consts)

    def residual(x, params, consts):
        return spec.problem(params, consts).residual(x)

    # ∂F/∂θ·θ̇ (θ = params and the closed-over arrays), then solve ∂F/∂x·ẋ = −∂F/∂θ·θ̇.
    _, rhs = jax.jvp(lambda p, c: residual(x, p, c), (params, consts), (params_dot, consts_dot))
    _, jacobian_vector_product = jax.linearize(lambda y: residual(y, params, consts), x)
    linear_solver = spec.linear_solver(limits)
    x_dot = lax.custom_linear_solve(
        jacobian_vector_product,
        tree_scale(-1, rhs),
        solve=_reporting(linear_solver, spec.on_failure, "tangent linear solve"),
        transpose_solve=_reporting(linear_solver, spec.on_failure, "adjoint linear solve"),
    )
    return (x, stats), (x_dot, jnp.zeros_like(stats))


def _reporting(linear_solver, on_failure: FailurePolicy, what: str):
    def solve(matvec, b):
        x, stats = linear_solver.solve(matvec, b)
        return apply_failure_policy(x, stats, on_failure, what)[0]

    return solve
