"""The linear-solver protocol, its verified driver loop, `Dense`, and user callables.

Every linear solve A·x = b (the tangent and adjoint systems, Newton's steps) goes through
`AbstractLinearSolver.solve`, which returns ``(x, SolveStats)``. Iterative methods subclass
`AbstractIterativeLinearSolver` and write three hooks; its driver owns the rest:

- it scales b by a power of two near max|b| (and x back), so that norms and inner products
  neither overflow nor underflow in float32 whatever the scale of the cotangent;
- it stops on the method's residual estimate, ``max_steps`` products, or a non-finite
  estimate (a breakdown);
- it then VERIFIES: `converged` means the true residual ‖b − A·x‖₂, recomputed with one more
  product, meets atol + rtol·‖b‖₂, and x is finite. Where a recurrence estimate drifted below
  the tolerance but the true residual did not, the method runs again on the true residual (a
  few rounds at most). A singular or inconsistent system, or a solver applied to a matrix it
  does not support (CG on a nonsymmetric one), is reported, never passed off as solved.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

from ._failure import SolveStats, make_stats
from ._options import (
    check_function_and_tolerances,
    check_instance,
    check_tolerance,
    dynamic_field,
    register,
    set_checked,
)
from ._sharding import make_varying, tree_varying_axes, while_loop
from ._termination import Tolerances, linear_threshold, resolve
from ._tree import (
    PyTree,
    accumulation_dtype,
    all_finite,
    cast_to,
    check_like,
    least_precise_dtype,
    max_abs,
    ravel,
    real_dtype,
    safe_norm,
    tree_add,
    tree_norm,
    tree_sub,
    tree_zeros_like,
    widest,
)

Matvec = Callable[[PyTree], PyTree]


class AbstractLinearSolver(abc.ABC):
    """Base class of every linear solver: ``solve(matvec, b) -> (x, SolveStats)`` on pytrees.

    Calling the solver, ``solver(matvec, b)``, returns x alone. Subclass
    `AbstractIterativeLinearSolver` for an iterative method (you get the verified driver);
    override `solve` directly for a direct method, as `Dense` does. Subclasses are frozen
    dataclasses and pytrees: fields made with ``implicax._options.dynamic_field`` (the
    tolerances) are leaves, the others static.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register(cls)

    def __call__(self, matvec: Matvec, b: PyTree) -> PyTree:
        return self.solve(matvec, b)[0]

    @abc.abstractmethod
    def solve(self, matvec: Matvec, b: PyTree) -> tuple[PyTree, SolveStats]:
        """Solve matvec(x) = b; `SolveStats.steps` counts matrix-vector products."""


class Budget(NamedTuple):
    """What an iterative step may spend: it must not go on past these (used by methods, like
    GMRES, whose step is itself a loop)."""

    threshold: jax.Array  # the target for the residual estimate
    products: jax.Array  # products still allowed

    def keep_going(self, estimate: jax.Array, used: jax.Array) -> jax.Array:
        return (estimate > self.threshold) & jnp.isfinite(estimate) & (used < self.products)


def default_step_limit(size: int) -> int:
    """max_steps=None for a linear solver: max(256, 16·⌈√n⌉) matrix-vector products.

    Krylov methods on discretised 2-D operators need about √cond ∝ grid side = √n iterations,
    so a fixed limit stops large problems early (a 256² Poisson adjoint at 256 products).
    """
    return max(256, 16 * math.isqrt(max(size - 1, 0)) + 16)


@dataclasses.dataclass(frozen=True)
class AbstractIterativeLinearSolver(Tolerances, AbstractLinearSolver):
    """An iterative linear solver, as three hooks over a state of its own:

    - ``init(matvec, b) -> state``, with x = 0;
    - ``step(matvec, b, state, budget) -> (state, estimate, products)``: one iteration; the
      estimate of ‖b − A·x‖₂ and the number of matrix-vector products it used. A non-finite
      estimate stops the loop (a breakdown);
    - ``solution(state) -> x``.

    b reaches the hooks scaled to max|b| ≈ 1. Fields: ``rtol``, ``atol`` (in b's units;
    default 0) and ``max_steps`` (products; None: ``max(256, 16·⌈√n⌉)``, n = size of b).
    """

    max_steps: Any = dynamic_field(None)

    def _scaled_step_limit(self) -> bool:
        return True

    @abc.abstractmethod
    def init(self, matvec: Matvec, b: PyTree) -> Any:
        """The state at x = 0."""

    @abc.abstractmethod
    def step(self, matvec: Matvec, b: PyTree, state: Any, budget: Budget) -> tuple[Any, Any, Any]:
        """One iteration: (state, residual estimate, matrix-vector products used)."""

    @abc.abstractmethod
    def solution(self, state: Any) -> PyTree:
        """The current x."""

    def solve(self, matvec, b):
        rtol, atol = self.resolve(b, atol_default_is_rtol=False)
        scale, unit_b = _scaled(b)
        norm_b = tree_norm(unit_b)
        threshold = linear_threshold(norm_b, rtol, atol / jnp.where(scale > 0, scale, 1))
        size = sum(leaf.size for leaf in jax.tree.leaves(b))
        max_steps = (
            jnp.asarray(default_step_limit(size), jnp.int32)
            if self.max_steps is None
            else self.step_limit()
        )
        axes = tree_varying_axes(b, jax.eval_shape(matvec, b))

        # One product of the budget is kept for the check that ends each round.
        limit = max_steps - 1

        def iterate(r, used):  # the method on A·δ = r from δ = 0, until its estimate stops it
            def cond(carry):
                _, estimate, used = carry
                return Budget(threshold, limit).keep_going(estimate, used)

            def body(carry):
                state, _, used = carry
                budget = Budget(threshold, limit - used)
                state, estimate, products = self.step(matvec, r, state, budget)
                return state, estimate.astype(norm_b.dtype), used + products

            state, _, used = while_loop(
                cond, body, (self.init(matvec, r), tree_norm(r), used), axes
            )
            return self.solution(state), used

        # Rounds of the method, each verified on the true residual with one product. A round
        # whose estimate drifted below the threshold while the true residual did not follow
        # is followed by another one on the true residual (iterative refinement).
        def round_cond(carry):
            _, _, residual, used, rounds = carry
            keep_going = Budget(threshold, max_steps).keep_going(residual, used)
            return keep_going & (rounds < _ROUNDS)

        def round_body(carry):
            x, r, _, used, rounds = carry
            delta, used = iterate(r, used)
            x = tree_add(x, delta)
            r = tree_sub(unit_b, matvec(x))
            return x, r, tree_norm(r), used + 1, rounds + 1

        zero = jnp.zeros((), jnp.int32)
        init = (tree_zeros_like(unit_b), unit_b, norm_b, zero, zero)
        unit_x, _, residual, used, _ = while_loop(round_cond, round_body, init, axes)
        # A non-finite true residual (a NaN or inf in b or A) makes x NaN too: it is no answer.
        scale = jnp.where(jnp.isfinite(residual), scale, jnp.nan)
        x = jax.tree.map(lambda leaf: _times(leaf, scale), unit_x)
        finite = all_finite(x) & jnp.isfinite(scale * residual)  # scaled back: may overflow
        stats = make_stats(used, scale * residual, finite & (residual <= threshold), ~finite)
        return x, stats


# Rounds of refinement at most: a round that ends short of the tolerance on a method's drifted
# estimate gets up to this many more; a method that stalls is stopped, not retried forever.
_ROUNDS = 4


def _scaled(b: PyTree) -> tuple[jax.Array, PyTree]:
    """(s, b / s) with s a power of two within a factor 2 of max|b| (exact scaling); s = 1
    where max|b| is 0 or not finite. A non-finite b stays non-finite, and the norms and the
    true residual, sums that keep NaN and inf, tell (the max, which may drop a NaN, only
    scales)."""
    largest = max_abs(b, finite=jnp.ones((), jnp.bool_))
    usable = (largest > 0) & jnp.isfinite(largest)
    scale = jnp.where(usable, jnp.exp2(jnp.floor(jnp.log2(jnp.where(usable, largest, 1)))), 1)
    unit = jax.tree.map(lambda leaf: _times(leaf, 1 / scale), b)
    return scale, unit


def _times(leaf: jax.Array, factor: jax.Array) -> jax.Array:
    """leaf·factor computed in the factor's (widest) dtype: a float32 leaf of a tree with
    float64 leaves may need a scale that float32 cannot represent."""
    wide = widest([leaf.dtype, factor.dtype])
    return (leaf.astype(wide) * factor.astype(wide)).astype(leaf.dtype)


@dataclasses.dataclass(frozen=True)
class Dense(AbstractLinearSolver):
    """Materialise A (n matrix-vector products, vectorised) and solve by LU with partial
    pivoting. For small n only: memory n², time n³.

    Converged means x is finite, A is not singular to working precision (every pivot
    exceeds n·eps·max|pivot|), and x solves a nearby system: the normwise backward error
    ‖b − A·x‖₂ / (‖A‖_F·‖x‖₂ + ‖b‖₂) is at most ``rtol``.

    Attributes:
        rtol: backward-error tolerance; None picks ``eps**(2/3)`` of the least precise dtype
            among b's leaves.
    """

    rtol: Any = dynamic_field(None)

    def __post_init__(self):
        set_checked(self, "rtol", check_tolerance("Dense", "rtol", self.rtol))

    def solve(self, matvec, b):
        # LU in at least float32, complex if a leaf of b is complex.
        dtype = accumulation_dtype(widest(leaf.dtype for leaf in jax.tree.leaves(b)))
        flat_b, unravel = ravel(b, dtype)
        n = flat_b.size
        axes = tree_varying_axes(b, jax.eval_shape(matvec, b))

        def flat_matvec(v):
            return ravel(matvec(unravel(v)), dtype)[0]

        basis = make_varying(jnp.eye(n, dtype=flat_b.dtype), axes)
        matrix = jax.vmap(flat_matvec)(basis).T
        lu, pivots = jsl.lu_factor(matrix)
        flat_x = jsl.lu_solve((lu, pivots), flat_b)
        residual = safe_norm(flat_b - flat_matvec(flat_x))
        # The least precise leaf sets the attainable accuracy (the matrix of a mixed
        # float32/float64 tree is float32-accurate in its float32 rows).
        eps = jnp.finfo(least_precise_dtype(b)).eps
        rtol = eps ** (2 / 3) if self.rtol is None else self.rtol
        rtol = jnp.asarray(rtol).astype(real_dtype(b))
        diagonal = jnp.abs(jnp.diagonal(lu))
        nonsingular = jnp.all(diagonal > jnp.asarray(n * eps, diagonal.dtype) * max_abs(diagonal))
        backward = rtol * (safe_norm(matrix) * safe_norm(flat_x) + safe_norm(flat_b))
        finite = jnp.all(jnp.isfinite(flat_x)) & jnp.isfinite(residual)
        converged = finite & nonsingular & (residual <= backward)
        return unravel(flat_x), make_stats(n + 1, residual, converged, ~finite)


@dataclasses.dataclass(frozen=True)
class CallableLinearSolver(AbstractLinearSolver):
    """A linear solver of yours given as a function, ``function(matvec, b) -> x`` on pytrees,
    and the tolerance its result is checked against.

    A bare callable passed as ``linear_solver=`` is wrapped in ``CallableLinearSolver(callable)``;
    wrap it yourself to set the tolerance. Its x is converged when it is finite and its true
    residual, from one more product, meets the built-in solvers' test
    ‖b − A·x‖₂ ≤ atol + rtol·‖b‖₂ (defaults: rtol = eps**(2/3) of b's least precise dtype,
    atol = 0; they may be traced arrays). `SolveStats.steps` is −1.

    Attributes:
        function: the solver, ``function(matvec, b) -> x`` with x like b.
        rtol: relative tolerance of the check (None: the default).
        atol: absolute tolerance of the check, in b's units (None: 0).
    """

    function: Callable[[Matvec, PyTree], PyTree]
    rtol: Any = dynamic_field(None)
    atol: Any = dynamic_field(None)

    def __post_init__(self):
        check_function_and_tolerances(self, "function(matvec, b) -> x")

    def solve(self, matvec, b):
        x = self.function(matvec, b)
        if jax.tree.structure(x) != jax.tree.structure(b):
            hint = (
                " A callable that returns (x, info), like jax.scipy.sparse.linalg.cg, must be "
                "wrapped: lambda matvec, b: cg(matvec, b)[0]."
                if isinstance(x, tuple) and len(x) == 2
                else ""
            )
            raise TypeError(
                "linear_solver(matvec, b) must return x with the structure of b; got "
                f"{jax.tree.structure(x)}, expected {jax.tree.structure(b)}.{hint}"
            )
        check_like(x, b, "linear_solver(matvec, b)", "b")
        rtol, atol = resolve(self.rtol, self.atol, b, atol_default_is_rtol=False)
        residual = safe_norm(tree_sub(b, matvec(x)))
        finite = all_finite(x) & jnp.isfinite(residual)
        converged = finite & (residual <= linear_threshold(safe_norm(b), rtol, atol))
        return x, make_stats(-1, residual, converged, ~finite)


def as_linear_solver(linear_solver: Any, owner: str = "linear_solver") -> AbstractLinearSolver:
    """An implicax linear solver as is; a callable ``linear_solver(matvec, b) -> x`` wrapped."""
    if isinstance(linear_solver, AbstractLinearSolver):
        return linear_solver
    check_instance(owner, "linear_solver", linear_solver)
    if not callable(linear_solver):
        raise TypeError(
            "linear_solver must be an implicax linear solver (CG, GMRES, BiCGStab, Neumann, "
            f"Dense) or a callable linear_solver(matvec, b) -> x, got {linear_solver!r}."
        )
    return CallableLinearSolver(linear_solver)


def complexified(matvec: Matvec, b: PyTree) -> tuple[Matvec, PyTree, Callable]:
    """For b with both complex and real leaves: the system on the tree with every leaf complex,
    and the map back to b's dtypes; otherwise (matvec, b, identity), at no cost.

    On such a mixed tree A is only real-linear (a real leaf takes no imaginary part), while the
    solvers' complex scalars need a complex-linear operator. The operator posed instead is A's
    complex-linear extension, A_C(u + i·w) = A(u) + i·A(w) for u, w holding the real and
    imaginary parts of the real leaves (the complex leaves go with u whole): two products per
    product. A_C is complex-linear when A is complex-linear in the complex leaves and the real
    leaves' rows do not depend on them (the residual holomorphic in x: a real-valued function
    of complex arguments cannot be), and it agrees with A on the real leaves, so its solution
    for a b of b's dtypes is A's. Otherwise the solve does not converge, and says so.
    """
    leaves = jax.tree.leaves(b)
    kinds = [jnp.issubdtype(leaf.dtype, jnp.complexfloating) for leaf in leaves]
    if all(kinds) or not any(kinds):
        return matvec, b, lambda x: x
    dtypes = [leaf.dtype for leaf in leaves]

    def widen(tree: PyTree) -> PyTree:
        return jax.tree.map(lambda leaf: leaf.astype(_complex_dtype(leaf.dtype)), tree)

    def restore(tree: PyTree) -> PyTree:
        return jax.tree.unflatten(
            jax.tree.structure(tree),
            [cast_to(leaf, d) for leaf, d in zip(jax.tree.leaves(tree), dtypes)],
        )

    def parts(tree: PyTree, imaginary: bool) -> PyTree:
        def part(leaf, dtype, is_complex):
            if is_complex:
                return jnp.zeros(leaf.shape, dtype) if imaginary else leaf.astype(dtype)
            return (jnp.imag(leaf) if imaginary else jnp.real(leaf)).astype(dtype)

        flat = [part(*a) for a in zip(jax.tree.leaves(tree), dtypes, kinds)]
        return jax.tree.unflatten(jax.tree.structure(tree), flat)

    def extended(v: PyTree) -> PyTree:
        real, imaginary = widen(matvec(parts(v, False))), widen(matvec(parts(v, True)))
        return jax.tree.map(lambda u, w: u + (1j * w).astype(u.dtype), real, imaginary)

    return extended, widen(b), restore


def _complex_dtype(dtype: Any) -> Any:
    """The complex dtype holding `dtype` (complex64 for float32 and narrower)."""
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.dtype(dtype)
    return jnp.dtype(jnp.complex128 if jnp.dtype(dtype).itemsize > 4 else jnp.complex64)
