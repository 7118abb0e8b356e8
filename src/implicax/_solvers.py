"""The built-in forward solvers, each as `init` / `step` hooks on `AbstractForwardSolver`."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ._forward import AbstractForwardSolver, Problem, Progress
from ._krylov import BiCGStab
from ._linear import AbstractLinearSolver, as_linear_solver, complexified
from ._options import (
    check_fraction,
    check_nonnegative,
    check_positive_int,
    dynamic_field,
    set_checked,
)
from ._tree import accumulation_dtype, ravel, tree_axpy, tree_scale, tree_sub, widest


class _Flat:
    """A pytree problem as one flat vector in at least float32 (for methods with histories)."""

    def __init__(self, problem: Problem):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), problem.like)
        self.dtype = accumulation_dtype(widest(leaf.dtype for leaf in jax.tree.leaves(zeros)))
        flat0, self.unravel = ravel(zeros, self.dtype)
        self.size = flat0.size
        self.problem = problem

    def ravel(self, tree: Any) -> jax.Array:
        return ravel(tree, self.dtype)[0]

    def map(self, flat: jax.Array) -> jax.Array:
        return self.ravel(self.problem.map(self.unravel(flat)))

    def residual(self, flat: jax.Array) -> jax.Array:
        return self.ravel(self.problem.residual(self.unravel(flat)))


def _set_row(buffer: jax.Array, i: Any, row: jax.Array) -> jax.Array:
    """buffer[i] = row, as an in-place dynamic-update-slice (no copy of the buffer)."""
    return lax.dynamic_update_index_in_dim(buffer, row.astype(buffer.dtype), i, 0)


def _adjoint_times(rows: jax.Array, v: jax.Array) -> jax.Array:
    """conj(rows)·v, the inner products ⟨row_i, v⟩, as conj(rows·conj(v)): conjugating the
    vector, not the (history, n) buffer. Free for real arrays (conj is the identity)."""
    return jnp.conj(rows @ jnp.conj(v))


@dataclasses.dataclass(frozen=True)
class FixedPointIteration(AbstractForwardSolver):
    """Picard iteration x ← x + damping·(g(x) − x).

    Converges linearly at the rate of the map's contraction. Each step evaluates g once and
    tests |g(x)_i − x_i| ≤ atol + rtol·|g(x)_i| (for `root_solve`, also the residual test);
    the solution is the next iterate (g(x) itself when damping is 1).

    Attributes:
        rtol, atol, max_steps: tolerances (None: ``eps**(2/3)`` of the dtype) and the most
            evaluations of g.
        damping: step fraction in (0, 1]; below 1 it can tame oscillating maps.
    """

    damping: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        set_checked(self, "damping", check_fraction("FixedPointIteration", "damping", self.damping))

    def init(self, problem, x0):
        return x0

    def step(self, problem, x):
        gx = problem.map(x)
        difference = tree_sub(gx, x)  # g(x) − x = −F(x)
        x_next = gx if self.damping == 1 else tree_axpy(self.damping, difference, x)
        return x_next, Progress(x_next, difference, difference)


class _AndersonState(NamedTuple):
    x: jax.Array  # the next point at which g is evaluated
    xs: jax.Array  # (history, n): past points
    fs: jax.Array  # (history, n): their g(x) − x
    gram: jax.Array  # (history, history): conj(fs)·fsᵀ (Hermitian), one row updated per step
    count: jax.Array  # steps taken


@dataclasses.dataclass(frozen=True)
class Anderson(AbstractForwardSolver):
    """Anderson acceleration (type II, Walker & Ni 2011) of the map g.

    Keeps the last `history` pairs (x_i, f_i = g(x_i) − x_i), chooses weights α with Σα = 1
    minimising ‖Σ α_i f_i‖² + λ‖α‖² (λ = `regularization` × the largest ‖f_i‖²), and steps to
    Σ α_i (x_i + damping·f_i). The Gram matrix is updated one row per step; memory is two
    vectors per history slot. Runs in at least float32. Stops like `FixedPointIteration`, with
    g at the last iterate as the solution.

    Attributes:
        rtol, atol, max_steps: as for `FixedPointIteration`.
        history: number of past iterates combined (m).
        damping: mixing β in (0, 1].
        regularization: relative Tikhonov term λ for the least-squares problem.
    """

    history: int = 5
    damping: float = 1.0
    regularization: float = 1e-8

    def __post_init__(self):
        super().__post_init__()
        set_checked(self, "history", check_positive_int("Anderson", "history", self.history))
        set_checked(self, "damping", check_fraction("Anderson", "damping", self.damping))
        regularization = check_nonnegative("Anderson", "regularization", self.regularization)
        set_checked(self, "regularization", regularization)

    def init(self, problem, x0):
        flat = _Flat(problem)
        m, n = self.history, flat.size
        zeros = jnp.zeros((m, n), flat.dtype)
        x = flat.ravel(x0)
        return _AndersonState(
            x, zeros, zeros, jnp.zeros((m, m), flat.dtype), jnp.zeros((), jnp.int32)
        )

    def step(self, problem, state):
        flat = _Flat(problem)
        m = self.history
        x, xs, fs, gram, count = state
        gx = flat.map(x)
        f = gx - x
        slot = count % m
        xs, fs = _set_row(xs, slot, x), _set_row(fs, slot, f)
        column = _adjoint_times(fs, f)  # ⟨f_i, f⟩
        gram = _set_row(gram, slot, jnp.conj(column))
        gram = lax.dynamic_update_index_in_dim(gram, column[:, None], slot, 1)
        active = jnp.arange(m, dtype=jnp.int32) < jnp.minimum(count + 1, m)
        alpha = _anderson_weights(gram, active, self.regularization)
        x_next = alpha @ xs + self.damping * (alpha @ fs)
        solution = flat.unravel(gx)
        difference = flat.unravel(f)
        return _AndersonState(x_next, xs, fs, gram, count + 1), Progress(
            solution, difference, difference
        )


def _anderson_weights(gram: jax.Array, active: jax.Array, regularization: float) -> jax.Array:
    """argmin_α αᴴ(G + λI)α subject to Σα = 1 and α_i = 0 for inactive i (G Hermitian).

    Solved through the bordered system [[0, 1ᵀ], [1, G + λI]]·[ν; α] = [1; 0], with the rows of
    inactive entries replaced by α_i = 0. G is scaled to unit diagonal maximum first, so the
    small solve is well conditioned even when the residuals are tiny.
    """
    m = gram.shape[0]
    mask = active[:, None] & active[None, :]
    diagonal = jnp.where(active, jnp.real(jnp.diagonal(gram)), 0)  # ‖f_i‖², real
    scale = jnp.max(diagonal)
    scale = jnp.where(scale > 0, scale, 1).astype(gram.dtype)
    eye = jnp.eye(m, dtype=gram.dtype)
    inner = jnp.where(mask, gram / scale + regularization * eye, eye)
    ones = active.astype(gram.dtype)
    bordered = jnp.block([[jnp.zeros((1, 1), gram.dtype), ones[None, :]], [ones[:, None], inner]])
    rhs = jnp.zeros(m + 1, gram.dtype).at[0].set(1)
    alpha = jnp.linalg.solve(bordered, rhs)[1:]
    # A singular bordered system (e.g. repeated iterates) falls back to the newest iterate.
    fallback = (
        jnp.zeros(m, gram.dtype)
        .at[jnp.argmax(jnp.where(active, jnp.arange(m, dtype=jnp.int32), -1))]
        .set(1)
    )
    return jnp.where(jnp.all(jnp.isfinite(alpha)), alpha, fallback)


class _BroydenState(NamedTuple):
    x: jax.Array
    fx: jax.Array  # F(x)
    us: jax.Array  # (history, n): H = I + Σ_{i < count} u_i v_iᴴ
    vs: jax.Array
    count: jax.Array  # rank-one updates in the current cycle


@dataclasses.dataclass(frozen=True)
class Broyden(AbstractForwardSolver):
    """Limited-memory "good" Broyden method on F(x) = 0.

    Keeps an approximate inverse Jacobian H = I + Σ u_i v_iᴴ (starting from the identity, so the
    first step is a fixed-point step), steps x ← x − damping·H·F(x), and updates H by the
    Sherman–Morrison form of Broyden's rank-one update, so that the new H maps the change in F
    to the step taken (the secant condition). When `history` updates are stored it restarts
    from the identity before the next update. Memory: two vectors per history slot. Runs in at
    least float32. Tests its full step −H·F(x) (before damping) for a root problem.

    Attributes:
        rtol, atol, max_steps: tolerances and the most evaluations of F (after F(x0)).
        history: rank-one updates kept before restarting.
        damping: step fraction in (0, 1].
    """

    history: int = 16
    damping: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        set_checked(self, "history", check_positive_int("Broyden", "history", self.history))
        set_checked(self, "damping", check_fraction("Broyden", "damping", self.damping))

    def init(self, problem, x0):
        flat = _Flat(problem)
        x = flat.ravel(x0)
        zeros = jnp.zeros((self.history, flat.size), flat.dtype)
        return _BroydenState(x, flat.residual(x), zeros, zeros, jnp.zeros((), jnp.int32))

    def step(self, problem, state):
        flat = _Flat(problem)
        x, fx, us, vs, count = state

        def apply(v, count):  # H·v = v + Σ_i u_i ⟨v_i, v⟩, over the active slots
            active = jnp.arange(self.history, dtype=jnp.int32) < count
            return v + jnp.where(active, _adjoint_times(vs, v), 0) @ us

        def apply_adjoint(v, count):  # Hᴴ·v = v + Σ_i v_i ⟨u_i, v⟩
            active = jnp.arange(self.history, dtype=jnp.int32) < count
            return v + jnp.where(active, _adjoint_times(us, v), 0) @ vs

        direction = -apply(fx, count)
        step = self.damping * direction
        x_new = x + step
        f_new = flat.residual(x_new)
        # A full memory restarts from H = I *before* this update, so that the update is
        # computed with the H it is applied to and the secant condition holds right after.
        count = jnp.where(count >= self.history, 0, count)
        h_df = apply(f_new - fx, count)
        denominator = jnp.vdot(step, h_df)  # ⟨step, H·Δf⟩
        usable = jnp.abs(denominator) > jnp.finfo(flat.dtype).tiny ** 0.5
        u = (step - h_df) / jnp.where(usable, denominator, 1)
        us = _set_row(us, count, jnp.where(usable, u, us[count]))
        # Hᴴ·step after writing row `count` of us, which the mask (< count) leaves out: read
        # after the write, the old us need not be kept, so the write is in place (before it,
        # XLA kept a copy of us: three vectors per slot instead of two).
        v = apply_adjoint(step, count)
        vs = _set_row(vs, count, jnp.where(usable, v, vs[count]))
        state = _BroydenState(x_new, f_new, us, vs, count + usable.astype(jnp.int32))
        return state, Progress(flat.unravel(x_new), flat.unravel(f_new), flat.unravel(direction))


class _NewtonState(NamedTuple):
    x: Any
    fx: Any  # F(x)


@dataclasses.dataclass(frozen=True)
class Newton(AbstractForwardSolver):
    """Newton's method, matrix-free: x ← x − damping·J⁻¹F(x), with J·v by forward-mode autodiff
    and the Newton system solved by `linear_solver` (BiCGStab by default). Quadratic convergence
    near the solution; each step costs one linearisation plus the linear solve. Tests its full
    step −J⁻¹F(x) (before damping) for a root problem. A Newton step whose linear solve did not
    converge still counts (inexact Newton), and is counted in `SolveStats.inner_failures`.

    Attributes:
        rtol, atol, max_steps: tolerances and the most Newton steps.
        damping: step fraction in (0, 1].
        linear_solver: solver for J·δ = −F(x); any implicax linear solver or callable.
    """

    max_steps: Any = dynamic_field(32)
    damping: float = 1.0
    linear_solver: Any = dynamic_field(None)

    def __post_init__(self):
        super().__post_init__()
        set_checked(self, "damping", check_fraction("Newton", "damping", self.damping))
        object.__setattr__(self, "linear_solver", _linear_solver_or_default(self.linear_solver))

    def init(self, problem, x0):
        return _NewtonState(x0, problem.residual(x0))

    def step(self, problem, state):
        x, fx = state
        _, jvp = jax.linearize(problem.residual, x)
        jvp, rhs, restore = complexified(jvp, tree_scale(-1, fx))
        delta, stats = self.linear_solver.solve(jvp, rhs)
        delta = restore(delta)
        x = tree_axpy(self.damping, delta, x)
        fx = problem.residual(x)
        return _NewtonState(x, fx), Progress(x, fx, delta, ~stats.converged)


def _linear_solver_or_default(linear_solver: Any) -> AbstractLinearSolver:
    return BiCGStab() if linear_solver is None else as_linear_solver(linear_solver, "Newton")
