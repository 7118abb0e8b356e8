"""Forward solvers: find x with F(x) = 0, or equivalently x = g(x) with g(x) = x − F(x).

A `Problem` gives both views of one equation, so each method uses the form it needs without
rounding the other: for `fixed_point_solve`, g is the user's map and F(x) = x − g(x); for
`root_solve`, F is the user's residual and g(x) = x − F(x). It also owns the stopping test,
which depends on the view (see `Problem.scaled_error`), not on the method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ._config import SolveStats, Tolerances
from ._linear import BiCGStab, _LinearSolver, as_linear_solver
from ._misc import (
    PyTree,
    max_abs,
    scaled_error,
    tree_axpy,
    tree_sub,
    tree_varying_axes,
    while_loop,
)


@dataclasses.dataclass(frozen=True)
class Problem:
    function: Callable[[PyTree], PyTree]
    fixed_point: bool

    def map(self, x: PyTree) -> PyTree:
        """g(x): the fixed-point map."""
        out = self.function(x)
        return out if self.fixed_point else tree_sub(x, out)

    def residual(self, x: PyTree) -> PyTree:
        """F(x): zero at the solution."""
        out = self.function(x)
        return tree_sub(x, out) if self.fixed_point else out

    def scaled_error(
        self,
        f: PyTree,
        step: PyTree | None,
        x: PyTree,
        size: jax.Array,
        initial_size: jax.Array,
        rtol: float,
        atol: float,
    ) -> jax.Array:
        """The stopping test: converged when this is ≤ 1 (never for NaN).

        ``f`` is ±F at the iterate, ``step`` the solver's last step before damping (None
        before the first), ``x`` the point that relative tolerances refer to,
        ``size`` = max|f| and ``initial_size`` = max|F(x0)|.

        For a fixed point, F(x) = x − g(x) is itself a step, in the units of x:
        |F_i| ≤ atol + rtol·|x_i|. A root problem's residual has units of its own (a gradient,
        a force), so two tests must hold. The step, in x's units: |step_i| ≤ atol + rtol·|x_i|.
        And the residual, against where it started: max|F| ≤ atol + rtol·max|F(x0)|. Before
        the first step only the residual test applies: a start within atol stops at once.
        The step test alone passes iterates that run away in small steps from a problem with
        no root; the residual test alone is loose after a start far from the root.
        """
        if self.fixed_point:
            return scaled_error(f, x, rtol, atol)
        residual = jnp.where(size == 0, 0, size / (atol + rtol * initial_size))
        return (
            residual if step is None else jnp.maximum(scaled_error(step, x, rtol, atol), residual)
        )


class _ForwardSolver(Tolerances):
    def solve(self, problem: Problem, x0: PyTree) -> tuple[PyTree, SolveStats]:
        raise NotImplementedError


def _keep_going(error, steps, max_steps):
    # `error <= 1` is False for NaN, and a non-finite error ends the loop early.
    return ~(error <= 1) & jnp.isfinite(error) & (steps < max_steps)


# The error before the first step: finite (so the loop starts) but never "converged".
_NOT_YET = jnp.finfo(jnp.float32).max


def _check_fraction(name: str, field: str, value: float, *, upper_inclusive: bool = True):
    ok = 0 < value <= 1 if upper_inclusive else 0 <= value < 1
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
        bounds = "(0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"{name}: {field} must be a float in {bounds}, got {value!r}.")


def _check_positive_int(name: str, field: str, value: int):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {field} must be an int >= 1, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class FixedPointIteration(_ForwardSolver):
    """Picard iteration x ← x + damping·(g(x) − x).

    Converges linearly at the rate of the map's contraction. Stops when
    |g(x)_i − x_i| ≤ atol + rtol·|g(x)_i| for every i (for `root_solve`, also
    max|F(x)| ≤ atol + rtol·max|F(x0)|), and returns the next iterate (g(x) itself when
    damping is 1).

    Attributes:
        rtol, atol, max_steps: tolerances (None: ``eps**(2/3)`` of the dtype) and the most
            evaluations of g.
        damping: step fraction in (0, 1]; below 1 it can tame oscillating maps.
    """

    damping: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _check_fraction("FixedPointIteration", "damping", self.damping)

    def solve(self, problem, x0):
        rtol, atol = self.resolve(x0)

        def body(carry):
            x, _, _, initial, steps = carry
            gx = problem.map(x)
            difference = tree_sub(gx, x)
            size = max_abs(difference)
            initial = jnp.where(steps == 0, size, initial)
            error = problem.scaled_error(difference, difference, gx, size, initial, rtol, atol)
            x = gx if self.damping == 1 else tree_axpy(self.damping, difference, x)
            return x, error, size, initial, steps + 1

        def cond(carry):
            return _keep_going(carry[1], carry[4], self.max_steps)

        not_yet = jnp.full((), _NOT_YET, max_abs(x0).dtype)
        init = (x0, not_yet, not_yet, not_yet, jnp.zeros((), jnp.int32))
        x, error, residual, _, steps = while_loop(cond, body, init, tree_varying_axes(x0))
        return x, SolveStats(steps, residual, error <= 1)


@dataclasses.dataclass(frozen=True)
class Anderson(_ForwardSolver):
    """Anderson acceleration (type II, Walker & Ni 2011) of the map g.

    Keeps the last `history` pairs (x_i, f_i = g(x_i) − x_i), chooses weights α with Σα = 1
    minimising ‖Σ α_i f_i‖² + λ‖α‖² (λ = `regularization` × the largest ‖f_i‖²), and steps to
    Σ α_i (x_i + damping·f_i). The Gram matrix is updated one row per step. Runs in at least
    float32. Stops like `FixedPointIteration` and returns g at the last iterate.

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
        _check_positive_int("Anderson", "history", self.history)
        _check_fraction("Anderson", "damping", self.damping)
        if not isinstance(self.regularization, (int, float)) or not self.regularization >= 0:
            raise ValueError(f"Anderson: regularization must be >= 0, got {self.regularization!r}.")

    def solve(self, problem, x0):
        rtol, atol = self.resolve(x0)
        flat0, unravel = ravel_pytree(x0)
        dtype = jnp.promote_types(flat0.dtype, jnp.float32)
        m, n = self.history, flat0.size

        def g(flat):
            return ravel_pytree(problem.map(unravel(flat.astype(flat0.dtype))))[0].astype(dtype)

        def body(carry):
            x, _, xs, fs, gram, _, _, initial, steps = carry
            gx = g(x)
            f = gx - x
            size = max_abs(f)
            initial = jnp.where(steps == 0, size, initial)
            error = problem.scaled_error(f, f, gx, size, initial, rtol, atol)
            slot = steps % m
            xs = xs.at[slot].set(x)
            fs = fs.at[slot].set(f)
            row = fs @ f
            gram = gram.at[slot].set(row).at[:, slot].set(row)
            active = jnp.arange(m) < jnp.minimum(steps + 1, m)
            alpha = _anderson_weights(gram, active, self.regularization)
            x_next = alpha @ xs + self.damping * (alpha @ fs)
            return x_next, gx, xs, fs, gram, error, size, initial, steps + 1

        def cond(carry):
            return _keep_going(carry[5], carry[8], self.max_steps)

        x = flat0.astype(dtype)
        not_yet = jnp.full((), _NOT_YET, dtype)
        init = (
            x,
            x,
            jnp.zeros((m, n), dtype),
            jnp.zeros((m, n), dtype),
            jnp.zeros((m, m), dtype),
            not_yet,
            not_yet,
            not_yet,
            jnp.zeros((), jnp.int32),
        )
        _, gx, *_, error, residual, _, steps = while_loop(cond, body, init, tree_varying_axes(x0))
        return unravel(gx.astype(flat0.dtype)), SolveStats(steps, residual, error <= 1)


def _anderson_weights(gram: jax.Array, active: jax.Array, regularization: float) -> jax.Array:
    """argmin_α αᵀ(G + λI)α subject to Σα = 1 and α_i = 0 for inactive i.

    Solved through the bordered system [[0, 1ᵀ], [1, G + λI]]·[ν; α] = [1; 0], with the rows of
    inactive entries replaced by α_i = 0. G is scaled to unit diagonal maximum first, so the
    small solve is well conditioned even when the residuals are tiny.
    """
    m = gram.shape[0]
    mask = active[:, None] & active[None, :]
    scale = jnp.max(jnp.where(active, jnp.diagonal(gram), 0))
    scale = jnp.where(scale > 0, scale, 1)
    eye = jnp.eye(m, dtype=gram.dtype)
    inner = jnp.where(mask, gram / scale + regularization * eye, eye)
    ones = active.astype(gram.dtype)
    bordered = jnp.block([[jnp.zeros((1, 1), gram.dtype), ones[None, :]], [ones[:, None], inner]])
    rhs = jnp.zeros(m + 1, gram.dtype).at[0].set(1)
    alpha = jnp.linalg.solve(bordered, rhs)[1:]
    # A singular bordered system (e.g. repeated iterates) falls back to the newest iterate.
    fallback = jnp.zeros(m, gram.dtype).at[jnp.argmax(jnp.where(active, jnp.arange(m), -1))].set(1)
    return jnp.where(jnp.all(jnp.isfinite(alpha)), alpha, fallback)


@dataclasses.dataclass(frozen=True)
class Broyden(_ForwardSolver):
    """Limited-memory "good" Broyden method on F(x) = 0.

    Keeps an approximate inverse Jacobian H = I + Σ u_i v_iᵀ (starting from the identity, so the
    first step is a fixed-point step), steps x ← x − damping·H·F(x), and updates H by the
    Sherman–Morrison form of Broyden's rank-one update. After `history` updates it restarts from
    the identity. Runs in at least float32. Stops when |F(x)_i| ≤ atol + rtol·|x_i| for
    `fixed_point_solve`; for `root_solve`, when the last undamped step satisfies
    |Δx_i| ≤ atol + rtol·|x_i| and max|F(x)| ≤ atol + rtol·max|F(x0)|.

    Attributes:
        rtol, atol, max_steps: tolerances and the most evaluations of F.
        history: rank-one updates kept before restarting.
        damping: step fraction in (0, 1].
    """

    history: int = 16
    damping: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        _check_positive_int("Broyden", "history", self.history)
        _check_fraction("Broyden", "damping", self.damping)

    def solve(self, problem, x0):
        rtol, atol = self.resolve(x0)
        flat0, unravel = ravel_pytree(x0)
        dtype = jnp.promote_types(flat0.dtype, jnp.float32)
        m, n = self.history, flat0.size

        def residual(flat):
            return ravel_pytree(problem.residual(unravel(flat.astype(flat0.dtype))))[0].astype(
                dtype
            )

        def apply(us, vs, v):  # H·v
            return v + us.T @ (vs @ v)

        def apply_transpose(us, vs, v):  # Hᵀ·v
            return v + vs.T @ (us @ v)

        def body(carry):
            x, fx, us, vs, count, _, _, steps = carry
            direction = -apply(us, vs, fx)  # the full quasi-Newton step, for the stopping test
            step = self.damping * direction
            x_new = x + step
            f_new = residual(x_new)
            df = f_new - fx
            h_df = apply(us, vs, df)
            denominator = step @ h_df
            usable = jnp.abs(denominator) > jnp.finfo(dtype).tiny ** 0.5
            count = jnp.where(count >= m, 0, count)
            us = jnp.where(count == 0, 0, us)
            vs = jnp.where(count == 0, 0, vs)
            u = (step - h_df) / jnp.where(usable, denominator, 1)
            v = apply_transpose(us, vs, step)
            us = jnp.where(usable, us.at[count].set(u), us)
            vs = jnp.where(usable, vs.at[count].set(v), vs)
            size = max_abs(f_new)
            error = problem.scaled_error(f_new, direction, x_new, size, initial, rtol, atol)
            return x_new, f_new, us, vs, count + usable, error, size, steps + 1

        def cond(carry):
            return _keep_going(carry[5], carry[7], self.max_steps)

        x = flat0.astype(dtype)
        fx = residual(x)
        initial = max_abs(fx)
        init = (
            x,
            fx,
            jnp.zeros((m, n), dtype),
            jnp.zeros((m, n), dtype),
            jnp.zeros((), jnp.int32),
            problem.scaled_error(fx, None, x, initial, initial, rtol, atol),
            initial,
            jnp.ones((), jnp.int32),
        )
        x, *_, error, residual_norm, steps = while_loop(cond, body, init, tree_varying_axes(x0))
        return unravel(x.astype(flat0.dtype)), SolveStats(steps, residual_norm, error <= 1)


@dataclasses.dataclass(frozen=True)
class Newton(_ForwardSolver):
    """Newton's method, matrix-free: x ← x − damping·J⁻¹F(x), with J·v by forward-mode autodiff
    and the Newton system solved by `linear_solver` (BiCGStab by default). Quadratic convergence
    near the solution; each step costs one linearisation plus the linear solve.
    Stops as `Broyden` does.

    Attributes:
        rtol, atol, max_steps: tolerances and the most Newton steps.
        damping: step fraction in (0, 1].
        linear_solver: solver for J·δ = −F(x); any implicax linear solver or callable.
    """

    max_steps: int = 32
    damping: float = 1.0
    linear_solver: _LinearSolver | Callable | None = None

    def __post_init__(self):
        super().__post_init__()
        _check_fraction("Newton", "damping", self.damping)
        if self.linear_solver is not None:
            as_linear_solver(self.linear_solver)

    def solve(self, problem, x0):
        rtol, atol = self.resolve(x0)
        linear_solver = as_linear_solver(self.linear_solver or BiCGStab())

        def body(carry):
            x, fx, _, _, steps = carry
            _, jvp = jax.linearize(problem.residual, x)
            delta, _ = linear_solver.solve(jvp, jax.tree.map(jnp.negative, fx))
            x = tree_axpy(self.damping, delta, x)
            fx = problem.residual(x)
            size = max_abs(fx)
            # The full Newton step, not the damped one: damping must not loosen the test.
            error = problem.scaled_error(fx, delta, x, size, initial, rtol, atol)
            return x, fx, error, size, steps + 1

        def cond(carry):
            return _keep_going(carry[2], carry[4], self.max_steps)

        fx = problem.residual(x0)
        initial = max_abs(fx)
        error = problem.scaled_error(fx, None, x0, initial, initial, rtol, atol)
        init = (x0, fx, error, initial, jnp.zeros((), jnp.int32))
        x, _, error, residual, steps = while_loop(cond, body, init, tree_varying_axes(x0))
        return x, SolveStats(steps, residual, error <= 1)
