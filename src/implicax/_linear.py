"""Linear solvers for the tangent and adjoint systems A·x = b, on pytrees, matrix-free.

Each solver is an immutable configuration; calling it as ``solver(matvec, b)`` returns x, and
``solver.solve(matvec, b)`` returns ``(x, SolveStats)``. `steps` counts matrix-vector products.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax import lax
from jax.flatten_util import ravel_pytree

from ._config import SolveStats, Tolerances
from ._misc import (
    PyTree,
    make_varying,
    tree_axpy,
    tree_norm,
    tree_sub,
    tree_varying_axes,
    tree_vdot,
    tree_zeros_like,
    while_loop,
)

Matvec = Callable[[PyTree], PyTree]


class _LinearSolver:
    symmetric: ClassVar[bool] = False  # whether the solver assumes A = Aᵀ (then Aᵀ reuses it)

    def __call__(self, matvec: Matvec, b: PyTree) -> PyTree:
        return self.solve(matvec, b)[0]

    def solve(self, matvec: Matvec, b: PyTree) -> tuple[PyTree, SolveStats]:
        raise NotImplementedError


class _IterativeLinearSolver(Tolerances, _LinearSolver):
    def _threshold(self, b: PyTree) -> jax.Array:
        """Converged when ‖b − A·x‖₂ ≤ atol + rtol·‖b‖₂; atol defaults to 0 here.

        A relative test only: cotangents of batch-mean losses are small, and an absolute floor
        at the forward solve's tolerance cost a 10× larger gradient error in the benchmarks.
        """
        rtol, _ = self.resolve(b)
        atol = 0.0 if self.atol is None else float(self.atol)
        return atol + rtol * tree_norm(b)


def _axes(matvec: Matvec, b: PyTree) -> frozenset:
    """Mesh axes the iteration's state varies over inside shard_map: those of b and of A·b."""
    return tree_varying_axes(b, jax.eval_shape(matvec, b))


def set_row(buffer: jax.Array, i: Any, row: jax.Array) -> jax.Array:
    """buffer[i] = row, as a dynamic-update-slice (a scatter compiles far slower on CPU)."""
    return lax.dynamic_update_index_in_dim(buffer, row.astype(buffer.dtype), i, 0)


def _stats(steps, residual_norm, threshold) -> SolveStats:
    return SolveStats(steps, residual_norm, residual_norm <= threshold)


def _keep_going(residual_norm, threshold, steps, max_steps):
    return (residual_norm > threshold) & jnp.isfinite(residual_norm) & (steps < max_steps)


@dataclasses.dataclass(frozen=True)
class CG(_IterativeLinearSolver):
    """Conjugate gradients. Only for symmetric positive-definite A (e.g. the Hessian of a
    strictly convex objective in `root_solve`); the transposed system reuses the same solve.

    Attributes:
        rtol, atol, max_steps: stop when ‖b − A·x‖₂ ≤ atol + rtol·‖b‖₂ or after max_steps
            matrix-vector products.
    """

    symmetric: ClassVar[bool] = True

    def solve(self, matvec, b):
        threshold = self._threshold(b)

        def body(carry):
            x, r, p, rr, steps = carry
            ap = matvec(p)
            alpha = rr / tree_vdot(p, ap)
            x = tree_axpy(alpha, p, x)
            r = tree_axpy(-alpha, ap, r)
            rr_new = tree_vdot(r, r)
            p = tree_axpy(rr_new / rr, p, r)
            return x, r, p, rr_new, steps + 1

        def cond(carry):
            return _keep_going(jnp.sqrt(carry[3]), threshold, carry[4], self.max_steps)

        init = (tree_zeros_like(b), b, b, tree_vdot(b, b), jnp.zeros((), jnp.int32))
        x, _, _, rr, steps = while_loop(cond, body, init, _axes(matvec, b))
        return x, _stats(steps, jnp.sqrt(rr), threshold)


@dataclasses.dataclass(frozen=True)
class BiCGStab(_IterativeLinearSolver):
    """Biconjugate gradients, stabilised (van der Vorst 1992): general nonsymmetric A, short
    recurrences, two matrix-vector products per iteration.

    Attributes:
        rtol, atol, max_steps: as for `CG`.
    """

    def solve(self, matvec, b):
        threshold = self._threshold(b)
        one = jnp.ones((), tree_vdot(b, b).dtype)

        def body(carry):
            x, r, p, v, rho, alpha, omega, _, steps = carry
            rho_new = tree_vdot(b, r)
            beta = (rho_new / rho) * (alpha / omega)
            p = tree_axpy(beta, tree_axpy(-omega, v, p), r)
            v = matvec(p)
            alpha = rho_new / tree_vdot(b, v)
            s = tree_axpy(-alpha, v, r)
            t = matvec(s)
            tt = tree_vdot(t, t)
            omega = jnp.where(tt > 0, tree_vdot(t, s) / jnp.where(tt > 0, tt, 1), 0)
            x = tree_axpy(omega, s, tree_axpy(alpha, p, x))
            r = tree_axpy(-omega, t, s)
            return x, r, p, v, rho_new, alpha, omega, tree_norm(r), steps + 2

        def cond(carry):
            return _keep_going(carry[7], threshold, carry[8], self.max_steps)

        zeros = tree_zeros_like(b)
        init = (zeros, b, zeros, zeros, one, one, one, tree_norm(b), jnp.zeros((), jnp.int32))
        x, *_, residual, steps = while_loop(cond, body, init, _axes(matvec, b))
        return x, _stats(steps, residual, threshold)


@dataclasses.dataclass(frozen=True)
class GMRES(_IterativeLinearSolver):
    """Restarted GMRES (Saad & Schultz 1986): minimises ‖b − A·x‖₂ over a Krylov space of
    dimension `restart`, then restarts from the new x. General nonsymmetric A.

    Gram–Schmidt is applied twice per step (numerically as robust as Householder for these
    sizes), and Givens rotations give the residual at every step, so it stops as soon as the
    tolerance is met, inside a cycle.

    Attributes:
        rtol, atol, max_steps: as for `CG`.
        restart: Krylov dimension per cycle (memory: restart + 1 vectors).
    """

    restart: int = 32

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.restart, bool) or not isinstance(self.restart, int) or self.restart < 1:
            raise ValueError(f"GMRES: restart must be an int >= 1, got {self.restart!r}.")

    def solve(self, matvec, b):
        threshold = self._threshold(b)
        axes = _axes(matvec, b)
        m = self.restart
        dtype = tree_vdot(b, b).dtype

        def project(basis, w):
            return sum(
                jnp.tensordot(vl.reshape(m + 1, -1), wl.reshape(-1), axes=1).astype(dtype)
                for vl, wl in zip(jax.tree.leaves(basis), jax.tree.leaves(w))
            )

        def combine(coefficients, basis):
            return jax.tree.map(
                lambda vl: jnp.tensordot(coefficients.astype(vl.dtype), vl, axes=1), basis
            )

        def arnoldi_step(state):
            basis, columns, g, cs, sn, j, steps = state
            w = matvec(jax.tree.map(lambda vl: vl[j], basis))
            h = project(basis, w)
            w = tree_sub(w, combine(h, basis))
            correction = project(basis, w)
            w = tree_sub(w, combine(correction, basis))
            h_next = tree_norm(w)
            safe = jnp.where(h_next > 0, h_next, 1)
            basis = jax.tree.map(
                lambda vl, wl: set_row(vl, j + 1, wl / safe.astype(wl.dtype)), basis, w
            )
            h = jnp.where(jnp.arange(m + 1) == j + 1, h_next, h + correction)

            def rotate(i, h):  # apply the i-th Givens rotation to rows i, i + 1
                hi, hk = lax.dynamic_slice_in_dim(h, i, 2)
                rotated = jnp.stack([cs[i] * hi + sn[i] * hk, cs[i] * hk - sn[i] * hi])
                return lax.dynamic_update_slice_in_dim(h, rotated, i, 0)

            h = lax.fori_loop(0, j, rotate, h)
            hj, hk = lax.dynamic_slice_in_dim(h, j, 2)
            radius = jnp.hypot(hj, hk)
            nonzero = radius > 0
            c = jnp.where(nonzero, hj / jnp.where(nonzero, radius, 1), 1)
            s = jnp.where(nonzero, hk / jnp.where(nonzero, radius, 1), 0)
            h = lax.dynamic_update_slice_in_dim(
                h, jnp.stack([radius, jnp.zeros_like(radius)]), j, 0
            )
            gj = g[j]
            g = lax.dynamic_update_slice_in_dim(g, jnp.stack([c * gj, -s * gj]), j, 0)
            columns = set_row(columns, j, h[:m])
            at_j = jnp.arange(m) == j
            cs, sn = jnp.where(at_j, c, cs), jnp.where(at_j, s, sn)
            return basis, columns, g, cs, sn, j + 1, steps + 1

        def cycle(carry):
            x, _, steps = carry
            r = tree_sub(b, matvec(x))
            beta = tree_norm(r)
            safe_beta = jnp.where(beta > 0, beta, 1)
            basis = jax.tree.map(
                lambda rl: set_row(
                    jnp.zeros((m + 1, *rl.shape), rl.dtype), 0, rl / safe_beta.astype(rl.dtype)
                ),
                r,
            )
            state = (
                basis,
                jnp.zeros((m, m), dtype),  # row k: the k-th column of the rotated Hessenberg R
                jnp.zeros(m + 1, dtype).at[0].set(beta),
                jnp.zeros(m, dtype),
                jnp.zeros(m, dtype),
                jnp.zeros((), jnp.int32),
                steps + 1,
            )

            def inner_cond(state):
                g, j, steps = state[2], state[5], state[6]
                return (j < m) & _keep_going(jnp.abs(g[j]), threshold, steps, self.max_steps)

            basis, columns, g, _, _, j, steps = while_loop(inner_cond, arnoldi_step, state, axes)
            active = jnp.arange(m) < j
            upper = jnp.where(active[:, None] & active[None, :], columns.T, jnp.eye(m, dtype=dtype))
            y = jsl.solve_triangular(upper, jnp.where(active, g[:m], 0), lower=False)
            update = combine(y, jax.tree.map(lambda vl: vl[:m], basis))
            return jax.tree.map(jnp.add, x, update), jnp.abs(g[j]), steps

        def cond(carry):
            return _keep_going(carry[1], threshold, carry[2], self.max_steps)

        init = (tree_zeros_like(b), tree_norm(b), jnp.zeros((), jnp.int32))
        x, residual, steps = while_loop(cond, cycle, init, axes)
        return x, _stats(steps, residual, threshold)


@dataclasses.dataclass(frozen=True)
class Neumann(_IterativeLinearSolver):
    """Successive approximation x ← x + (b − A·x): the Neumann series for A = I − J.

    For a fixed point x = f(x, θ) with contractive J = ∂f/∂x this is Christianson's two-phase
    reverse accumulation (fax's `two_phase_solve`): the adjoint iterates at the rate of the
    forward iteration, one Jacobian product per step. It diverges when ‖J‖ ≥ 1.

    Attributes:
        rtol, atol, max_steps: as for `CG`.
    """

    def solve(self, matvec, b):
        threshold = self._threshold(b)

        def body(carry):
            x, r, _, steps = carry
            x = jax.tree.map(jnp.add, x, r)
            r = tree_sub(r, matvec(r))
            return x, r, tree_norm(r), steps + 1

        def cond(carry):
            return _keep_going(carry[2], threshold, carry[3], self.max_steps)

        init = (tree_zeros_like(b), b, tree_norm(b), jnp.zeros((), jnp.int32))
        x, _, residual, steps = while_loop(cond, body, init, _axes(matvec, b))
        return x, _stats(steps, residual, threshold)


@dataclasses.dataclass(frozen=True)
class Dense(_LinearSolver):
    """Materialise A (n matrix-vector products, vectorised) and solve by LU. For small n only:
    memory n², time n³. Converged means the solution is finite."""

    def solve(self, matvec, b):
        flat_b, unravel = ravel_pytree(b)
        n = flat_b.size

        def flat_matvec(v):
            return ravel_pytree(matvec(unravel(v)))[0]

        basis = make_varying(jnp.eye(n, dtype=flat_b.dtype), _axes(matvec, b))
        columns = jax.vmap(flat_matvec)(basis)
        x = jnp.linalg.solve(columns.T, flat_b)
        residual = jnp.linalg.norm(flat_b - flat_matvec(x))
        stats = SolveStats(jnp.asarray(n + 1, jnp.int32), residual, jnp.all(jnp.isfinite(x)))
        return unravel(x), stats


def as_linear_solver(linear_solver) -> _LinearSolver:
    """Wrap a user callable ``linear_solver(matvec, b) -> x`` so it reports statistics."""
    if isinstance(linear_solver, _LinearSolver):
        return linear_solver
    if not callable(linear_solver):
        raise TypeError(
            "linear_solver must be an implicax linear solver (CG, GMRES, BiCGStab, Neumann, "
            f"Dense) or a callable linear_solver(matvec, b) -> x, got {linear_solver!r}."
        )
    return _CallableLinearSolver(linear_solver)


@dataclasses.dataclass(frozen=True)
class _CallableLinearSolver(_LinearSolver):
    function: Callable[[Matvec, PyTree], PyTree]

    def solve(self, matvec, b):
        x = self.function(matvec, b)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(x)]))
        return x, SolveStats(jnp.asarray(-1, jnp.int32), tree_norm(tree_sub(b, matvec(x))), finite)
