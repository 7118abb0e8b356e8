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
from jax.custom_derivatives import SymbolicZero

from ._failure import (
    FailurePolicy,
    SolveStats,
    apply_failure_policy,
    probe_record,
    tracing_solve,
)
from ._forward import CallableSolver, Problem
from ._krylov import CG, GMRES, BiCGStab, Neumann
from ._linear import complexified
from ._termination import default_tolerance
from ._tree import PyTree, check_like, least_precise_dtype, ravel, tree_scale


@dataclasses.dataclass(frozen=True, eq=False)
class Spec:
    """Everything about a solve that is not an array: the non-differentiable argument.

    The solvers' tolerances and step limits given as arrays travel beside the spec
    (`limits`), so that they may be traced; `solvers` puts them back with the others.
    """

    function: Callable  # function(x, params, *consts), closure-converted
    fixed_point: bool
    solvers: Any  # (treedef, constant leaves, which leaves are traced) of the two solvers
    on_failure: tuple[FailurePolicy, FailurePolicy]  # (forward solve, linear solves)
    site: Any  # the user's call (file, line, module globals), named in reports
    name: str | None = None  # the solve's name in reports

    def what(self, solve: str) -> str:
        """The report's name for one of the solve's solves ("forward solve", ...)."""
        return solve if self.name is None else f"{solve} of {self.name!r}"

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
            return x, solver.stats(problem, x0, x)
        return solver.solve(problem, x0)

    def linear_solver(self, limits):
        return self.unflatten_solvers(limits)[1]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def solve(spec: Spec, limits, x0, params, consts, probe=None):
    """(x, packed forward statistics). `probe` (see `stats_probe`) is never read: its tangent
    is where the adjoint solve writes its statistics."""
    with tracing_solve():
        x, stats = spec.forward(limits, x0, params, consts)
        x, stats = apply_failure_policy(
            x, stats, spec.on_failure[0], spec.what("forward solve"), spec.site
        )
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


def _solve_jvp(spec: Spec, primals, tangents):
    limits, x0, params, consts, probe = primals
    x, stats = solve(spec, limits, x0, params, consts, probe)
    with tracing_solve():  # (after the primal solve, which is not nested in its own rule)
        x_dot = _tangent(spec, primals, tangents, x)
    return (x, stats), (x_dot, jnp.zeros_like(stats))


def _tangent(spec: Spec, primals, tangents, x):
    limits, x0, params, consts, probe = primals

    # Only the inputs that carry a tangent (symbolic zeros mark the others) enter ∂F/∂θ·θ̇;
    # undifferentiated parameters cost no derivative work.
    inputs, inputs_def = jax.tree.flatten((params, consts))
    inputs_dot = jax.tree.leaves(tangents[2:4], is_leaf=lambda t: isinstance(t, SymbolicZero))
    probe_dot = tangents[4]
    if probe_dot is None or isinstance(probe_dot, SymbolicZero):  # no statistics asked for
        probe_dot = None
    live = [i for i, t in enumerate(inputs_dot) if not isinstance(t, SymbolicZero)]

    def residual(y, *live_inputs):
        full = list(inputs)
        for i, value in zip(live, live_inputs):
            full[i] = value
        params, consts = jax.tree.unflatten(inputs_def, full)
        return spec.problem(params, consts).residual(y)

    # ∂F/∂θ·θ̇, then solve ∂F/∂x·ẋ = −∂F/∂θ·θ̇.
    live_inputs = [inputs[i] for i in live]
    _, rhs = jax.jvp(
        lambda *live_inputs: residual(x, *live_inputs),
        live_inputs,
        [inputs_dot[i] for i in live],
    )
    _, jacobian_vector_product = jax.linearize(lambda y: residual(y, *live_inputs), x)
    x_dot = _linear_solve(
        jacobian_vector_product,
        tree_scale(-1, rhs),
        spec.linear_solver(limits),
        functools.partial(apply_failure_policy, on_failure=spec.on_failure[1], site=spec.site),
        spec.what,
        probe_dot,
    )
    return x_dot


solve.defjvp(_solve_jvp, symbolic_zeros=True)


def _linear_solve(
    matvec, b, linear_solver, report: Callable, what: Callable, probe_dot=None
) -> PyTree:
    """x with matvec(x) = b, by `lax.custom_linear_solve` (which JAX transposes for reverse
    mode), each solve reported as the failure policy says.

    Its transpose rule needs every leaf of b to depend on the tangents being transposed; a
    leaf of a pytree x whose residual does not depend on them (an unpenalised bias, one of
    two hyperparameters, part of a DEQ state) would not, and JAX would fail with a bare
    AssertionError. So a tree of several leaves is solved as one vector. Tying each leaf to
    the others by an exact zero is not enough: JAX's own derivative of a linear solve, at the
    next order, builds a new one on the same tree. A tree of complex and real leaves is posed
    with every leaf complex (`complexified`).

    With `probe_dot` (the tangent of a `stats_probe`), the system is extended by the identity
    on the probe, [A 0; 0 I]·[x; s] = [b; ṗ], and the adjoint solve returns s̄ plus its
    statistics' record there: transposition carries them to the probe's cotangent.
    """
    # A non-holomorphic fn of a complex x makes a system no complex solver solves; say so.
    complex_x = any(jnp.iscomplexobj(leaf) for leaf in jax.tree.leaves(b))
    hint = " of a complex x (fn must be holomorphic in x)" if complex_x else ""

    def reporting(solver, view=lambda solve: solve):  # (solve, transpose_solve)
        tangent = _reporting(solver, report, what("tangent linear solve") + hint)
        adjoint = _reporting(solver, report, what("adjoint linear solve") + hint)
        return view(tangent), view(adjoint)

    matvec, b, restore = complexified(matvec, b)
    if len(jax.tree.leaves(b)) == 1 and probe_dot is None:  # (one leaf: nothing to restore)
        tangent, adjoint = reporting(linear_solver)
        return lax.custom_linear_solve(
            matvec, b, solve=_first(tangent), transpose_solve=_first(adjoint)
        )
    flat_b, unravel = ravel(b)

    def as_vector(tree: PyTree) -> jax.Array:
        return ravel(tree, flat_b.dtype)[0]

    def on_trees(tree_solve):  # a solver of yours sees the tree
        def solve(flat_matvec, v):
            tree_matvec = lambda tree: unravel(flat_matvec(as_vector(tree)))  # noqa: E731
            x, stats = tree_solve(tree_matvec, unravel(v))
            return as_vector(x), stats

        return solve

    vector_solver = _for_vectors(linear_solver, b, as_vector, unravel)
    tangent, adjoint = (
        reporting(linear_solver, on_trees) if vector_solver is None else reporting(vector_solver)
    )
    flat_matvec = lambda v: as_vector(matvec(unravel(v)))  # noqa: E731
    if probe_dot is None:
        flat_x = lax.custom_linear_solve(
            flat_matvec, flat_b, solve=_first(tangent), transpose_solve=_first(adjoint)
        )
    else:
        flat_x = _probed_solve(flat_matvec, flat_b, tangent, adjoint, probe_dot)
    return restore(unravel(flat_x))


def _probed_solve(matvec, b: jax.Array, tangent, adjoint, probe_dot: jax.Array) -> jax.Array:
    """The solve of `_linear_solve` on [b; ṗ], recording the adjoint's statistics (see there)."""
    n, k = b.size, probe_dot.size

    def split(solve, record):
        def extended(extended_matvec, v):
            # The system is block diagonal: its first block is A (or Aᵀ) on vectors [u; 0].
            zeros = jnp.zeros(k, v.dtype)
            inner = lambda u: extended_matvec(jnp.concatenate([u, zeros]))[:n]  # noqa: E731
            x, stats = solve(inner, v[:n])
            s = v[n:] + probe_record(stats, v.dtype) if record else v[n:]
            return jnp.concatenate([x, s])

        return extended

    solution = lax.custom_linear_solve(
        lambda v: jnp.concatenate([matvec(v[:n]), v[n:]]),
        jnp.concatenate([b, probe_dot.ravel().astype(b.dtype)]),
        solve=split(tangent, record=False),
        transpose_solve=split(adjoint, record=True),
    )
    return solution[:n]


def _first(solve: Callable) -> Callable:
    return lambda matvec, b: solve(matvec, b)[0]


_VECTOR_SOLVERS = (BiCGStab, CG, GMRES, Neumann)


def _for_vectors(linear_solver, b: PyTree, as_vector: Callable, unravel: Callable):
    """A built-in Krylov solver set up to run on the raveled b, or None for other solvers
    (yours, and `Dense`, which ravels itself), which see the tree.

    On one vector each operation of the method is one operation, not one per leaf: for the
    gradient of a 30-leaf fixed point, half the fusions, and GMRES compiles 1.5× faster. The
    default tolerance stays that of b's least precise leaf, and a preconditioner still sees
    the tree.
    """
    if type(linear_solver) not in _VECTOR_SOLVERS:
        return None
    changes: dict[str, Any] = {}
    if linear_solver.rtol is None:
        changes["rtol"] = default_tolerance(least_precise_dtype(b))
    preconditioner = getattr(linear_solver, "preconditioner", None)
    if preconditioner is not None:
        changes["preconditioner"] = lambda v: as_vector(preconditioner(unravel(v)))
    return dataclasses.replace(linear_solver, **changes)


def _reporting(linear_solver, report: Callable, what: str):
    def solve(matvec, b):  # -> (x, stats)
        x, stats = linear_solver.solve(matvec, b)
        return report(x, stats, what=what)

    return solve
