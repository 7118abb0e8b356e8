"""Linear solvers for the tangent and adjoint systems A·x = b, on pytrees, matrix-free.

Each solver is an immutable configuration; calling it as ``solver(matvec, b)`` returns x, and
``solver.solve(matvec, b)`` returns ``(x, SolveStats)``. `steps` counts matrix-vector products.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax import lax
from jax.flatten_util import ravel_pytree

from ._config import SolveStats, Tolerances
from ._misc import (
    PyTree,
    tree_axpy,
    tree_norm,
    tree_sub,
    tree_vdot,
    tree_zeros_like,
)

Matvec = Callable[[PyTree], PyTree]


class _LinearSolver:
    def __call__(self, matvec: Matvec, b: PyTree) -> PyTree:
        return self.solve(matvec, b)[0]

    def solve(self, matvec: Matvec, b: PyTree) -> tuple[PyTree, SolveStats]:
        raise NotImplementedError


class _IterativeLinearSolver(Tolerances, _LinearSolver):
    def _threshold(self, b: PyTree) -> jax.Array:
        """Converged when ‖b − A·x‖₂ ≤ atol + rtol·‖b‖₂."""
        rtol, atol = self.resolve(b)
        return atol + rtol * tree_norm(b)


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

    symmetric = True

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
        x, _, _, rr, steps = lax.while_loop(cond, body, init)
        return x, _stats(steps, jnp.sqrt(rr), threshold)


@dataclasses.dataclass(frozen=True)
class BiCGStab(_IterativeLinearSolver):
    """Biconjugate gradients, stabilised (van der Vorst 1992): general nonsymmetric A, short
    recurrences, two matrix-vector products per iteration.

    Attributes:
        rtol, atol, max_steps: as for `CG`.
    """

    symmetric = False

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
        x, *_, residual, steps = lax.while_loop(cond, body, init)
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
    symmetric = False

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.restart, bool) or not isinstance(self.restart, int) or self.restart < 1:
            raise ValueError(f"GMRES: restart must be an int >= 1, got {self.restart!r}.")

    def solve(self, matvec, b):
        threshold = self._threshold(b)
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
            basis, hessenberg, g, cs, sn, j, steps = state
            w = matvec(jax.tree.map(lambda vl: vl[j], basis))
            h = project(basis, w)
            w = tree_sub(w, combine(h, basis))
            correction = project(basis, w)
            w = tree_sub(w, combine(correction, basis))
            h = h + correction
            h_next = tree_norm(w)
            safe = jnp.where(h_next > 0, h_next, 1)
            basis = jax.tree.map(lambda vl, wl: vl.at[j + 1].set(wl / safe.astype(wl.dtype)), basis, w)
            h = h.at[j + 1].set(h_next)

            def rotate(i, h):
                hi, hk = h[i], h[i + 1]
                return h.at[i].set(cs[i] * hi + sn[i] * hk).at[i + 1].set(-sn[i] * hi + cs[i] * hk)

            h = lax.fori_loop(0, j, rotate, h)
            denominator = jnp.hypot(h[j], h[j + 1])
            safe_denominator = jnp.where(denominator > 0, denominator, 1)
            c = jnp.where(denominator > 0, h[j] / safe_denominator, 1)
            s = jnp.where(denominator > 0, h[j + 1] / safe_denominator, 0)
            h = h.at[j].set(denominator).at[j + 1].set(0)
            g = g.at[j + 1].set(-s * g[j]).at[j].set(c * g[j])
            hessenberg = hessenberg.at[:, j].set(h)
            return basis, hessenberg, g, cs.at[j].set(c), sn.at[j].set(s), j + 1, steps + 1

        def cycle(carry):
            x, _, steps = carry
            r = tree_sub(b, matvec(x))
            beta = tree_norm(r)
            safe_beta = jnp.where(beta > 0, beta, 1)
            basis = jax.tree.map(
                lambda rl: jnp.zeros((m + 1, *rl.shape), rl.dtype).at[0].set(rl / safe_beta.astype(rl.dtype)),
                r,
            )
            state = (
                basis,
                jnp.zeros((m + 1, m), dtype),
                jnp.zeros(m + 1, dtype).at[0].set(beta),
                jnp.zeros(m, dtype),
                jnp.zeros(m, dtype),
                jnp.zeros((), jnp.int32),
                steps + 1,
            )

            def inner_cond(state):
                g, j, steps = state[2], state[5], state[6]
                return (j < m) & _keep_going(jnp.abs(g[j]), threshold, steps, self.max_steps)

            basis, hessenberg, g, _, _, j, steps = lax.while_loop(inner_cond, arnoldi_step, state)
            active = jnp.arange(m) < j
            upper = jnp.where(active[:, None] & active[None, :], hessenberg[:m], jnp.eye(m, dtype=dtype))
            y = jsl.solve_triangular(upper, jnp.where(active, g[:m], 0), lower=False)
            x = jax.tree.map(lambda xl, d: xl + d, x, combine(y, jax.tree.map(lambda vl: vl[:m], basis)))
            return x, jnp.abs(g[j]), steps

        def cond(carry):
            return _keep_going(carry[1], threshold, carry[2], self.max_steps)

        init = (tree_zeros_like(b), tree_norm(b), jnp.zeros((), jnp.int32))
        x, residual, steps = lax.while_loop(cond, cycle, init)
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

    symmetric = False

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
        x, _, residual, steps = lax.while_loop(cond, body, init)
        return x, _stats(steps, residual, threshold)


@dataclasses.dataclass(frozen=True)
class Dense(_LinearSolver):
    """Materialise A (n matrix-vector products, vectorised) and solve by LU. For small n only:
    memory n², time n³. Converged means the solution is finite."""

    symmetric = False

    def solve(self, matvec, b):
        flat_b, unravel = ravel_pytree(b)
        n = flat_b.size

        def flat_matvec(v):
            return ravel_pytree(matvec(unravel(v)))[0]

        columns = jax.vmap(flat_matvec)(jnp.eye(n, dtype=flat_b.dtype))
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
    symmetric = False

    def solve(self, matvec, b):
        x = self.function(matvec, b)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(x)]))
        return x, SolveStats(jnp.asarray(-1, jnp.int32), tree_norm(tree_sub(b, matvec(x))), finite)
