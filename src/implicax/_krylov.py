"""Krylov and stationary iterations for A·x = b, as hooks of `AbstractIterativeLinearSolver`.

Each runs on b scaled to max|b| ≈ 1 (so its inner products cannot overflow) and is verified by
the driver at exit; see `_linear`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax import lax

from ._linear import AbstractIterativeLinearSolver
from ._options import check_callable, check_positive_int, set_checked
from ._sharding import tree_varying_axes, while_loop
from ._tree import (
    PyTree,
    tree_add,
    tree_axpy,
    tree_norm,
    tree_sub,
    tree_vdot,
    tree_zeros_like,
)

_PRECONDITIONER = "preconditioner(v) -> M⁻¹v on pytrees like b"


def _identity(v: PyTree) -> PyTree:
    return v


class _CGState(NamedTuple):
    x: PyTree
    r: PyTree
    p: PyTree
    rz: jax.Array  # ⟨r, M⁻¹r⟩


@dataclasses.dataclass(frozen=True)
class CG(AbstractIterativeLinearSolver):
    """Conjugate gradients (preconditioned), for symmetric (complex: Hermitian) positive-definite
    A, e.g. the Hessian of a strictly convex objective in `root_solve`.

    Symmetry is never assumed elsewhere: the adjoint system runs CG on the transposed operator,
    and every solve is verified on its true residual, so CG applied to a matrix that is not
    SPD either solves the system it was given or is reported as failed.

    Attributes:
        rtol, atol, max_steps: stop when ‖b − A·x‖₂ ≤ atol + rtol·‖b‖₂, or after max_steps
            matrix-vector products (None: ``max(256, 16·⌈√n⌉)``).
        preconditioner: None, or a callable v ↦ M⁻¹v with M symmetric positive definite
            and M ≈ A.
    """

    preconditioner: Callable | None = None

    def __post_init__(self):
        super().__post_init__()
        check_callable("CG", "preconditioner", self.preconditioner, _PRECONDITIONER)

    def init(self, matvec, b):
        z = (self.preconditioner or _identity)(b)
        return _CGState(tree_zeros_like(b), b, z, jnp.real(tree_vdot(b, z)))

    def step(self, matvec, b, state, budget):
        x, r, p, rz = state
        ap = matvec(p)
        alpha = rz / jnp.real(tree_vdot(p, ap))
        x = tree_axpy(alpha, p, x)
        r = tree_axpy(-alpha, ap, r)
        z = (self.preconditioner or _identity)(r)
        rz_new = jnp.real(tree_vdot(r, z))
        p = tree_axpy(rz_new / rz, p, z)
        estimate = jnp.sqrt(rz_new) if self.preconditioner is None else tree_norm(r)
        return _CGState(x, r, p, rz_new), estimate, 1

    def solution(self, state):
        return state.x


class _BiCGStabState(NamedTuple):
    x: PyTree
    r: PyTree
    shadow: PyTree  # r̂, the shadow residual
    p: PyTree
    v: PyTree
    rho: jax.Array
    alpha: jax.Array
    omega: jax.Array
    norm_r: jax.Array
    norm_shadow: jax.Array
    spread: PyTree  # the fixed unit vector of fresh shadows


@dataclasses.dataclass(frozen=True)
class BiCGStab(AbstractIterativeLinearSolver):
    """Biconjugate gradients, stabilised (van der Vorst 1992), right-preconditioned: general
    nonsymmetric A, short recurrences, two matrix-vector products per iteration.

    On a breakdown (the shadow residual r̂ turns orthogonal to the residual, ⟨r̂, r⟩ ≈ 0, or
    the stabilising step vanishes, ω ≈ 0) it restarts from the current iterate with a new shadow residual close to r, instead
    of dividing by zero.

    Attributes:
        rtol, atol, max_steps: as for `CG`.
        preconditioner: None, or a callable v ↦ M⁻¹v with M ≈ A (A·M⁻¹ is iterated; the
            residual tested is that of A·x = b).
    """

    preconditioner: Callable | None = None

    def __post_init__(self):
        super().__post_init__()
        check_callable("BiCGStab", "preconditioner", self.preconditioner, _PRECONDITIONER)

    def init(self, matvec, b):
        zeros = tree_zeros_like(b)
        norm_b = tree_norm(b)
        one = jnp.ones((), tree_vdot(b, b).dtype)
        return _BiCGStabState(zeros, b, b, zeros, zeros, one, one, one, norm_b, norm_b, _spread(b))

    def step(self, matvec, b, state, budget):
        x, r, shadow, p, v, rho, alpha, omega, norm_r, norm_shadow, spread = state
        precondition = self.preconditioner or _identity
        rho_new = tree_vdot(shadow, r)
        tiny = jnp.finfo(norm_r.dtype).eps ** (2 / 3)
        restart = (jnp.abs(rho_new) <= tiny * norm_shadow * norm_r) | (omega == 0)

        # The fresh shadow r̂ = r + ½‖r‖·u (u a fixed unit vector spread over every entry):
        # |⟨r̂, r⟩| = |‖r‖² + ½‖r‖⟨u, r⟩| ≥ ½‖r‖² > 0, so the new ρ cannot vanish at once,
        # where r̂ = r alone fails again at once on a permutation (⟨r, A·r⟩ = 0).
        # A branch, not a select: restarts are rare, and the select cost every iteration
        # three passes over the vectors (under vmap the branch is a select again).
        def fresh_shadow():
            ur = tree_vdot(spread, r)  # complex for complex r: ρ keeps its imaginary part
            fresh_norm = jnp.sqrt(jnp.maximum(1.25 * norm_r**2 + norm_r * jnp.real(ur), 0))
            half = (0.5 * norm_r).astype(ur.dtype)
            rho = ((norm_r**2).astype(ur.dtype) + half * ur).astype(rho_new.dtype)
            return tree_axpy(0.5 * norm_r, spread, r), fresh_norm, rho

        shadow, norm_shadow, rho_new = lax.cond(
            restart, fresh_shadow, lambda: (shadow, norm_shadow, rho_new)
        )
        beta = jnp.where(restart, 0, (rho_new / rho) * (alpha / jnp.where(omega == 0, 1, omega)))
        p = tree_axpy(beta, tree_axpy(-omega, v, p), r)
        p_hat = precondition(p)
        v = matvec(p_hat)
        shadow_v = tree_vdot(shadow, v)
        # ⟨r̂, v⟩ ≈ 0 would make α huge: skip this iteration (α = ω = 0) and restart the next.
        alpha_usable = jnp.abs(shadow_v) > tiny * norm_shadow * tree_norm(v)
        alpha = jnp.where(alpha_usable, rho_new / jnp.where(alpha_usable, shadow_v, 1), 0)
        s = tree_axpy(-alpha, v, r)
        s_hat = precondition(s)
        t = matvec(s_hat)
        tt = jnp.real(tree_vdot(t, t))
        ts = tree_vdot(t, s)
        omega = jnp.where(tt > 0, ts / jnp.where(tt > 0, tt, 1).astype(ts.dtype), 0)
        # ω ≈ 0 relative to α (t ⊥ s, e.g. every step on a skew-symmetric A) is a breakdown
        # too: ω = 0 then keeps the BiCG half-step and restarts the next iteration, instead of
        # β ∝ 1/ω. (Both have the units of 1/A, so the test needs no extra norm.)
        # (alpha = 0 where it was not usable: then |ω| > 0 = tiny·|α| alone would pass.)
        omega = jnp.where((alpha != 0) & (jnp.abs(omega) > tiny * jnp.abs(alpha)), omega, 0)
        x = tree_axpy(omega, s_hat, tree_axpy(alpha, p_hat, x))
        r = tree_axpy(-omega, t, s)
        norm_r = tree_norm(r)
        state = _BiCGStabState(
            x, r, shadow, p, v, rho_new, alpha, omega, norm_r, norm_shadow, spread
        )
        return state, norm_r, 2

    def solution(self, state):
        return state.x


def _spread(like: PyTree) -> PyTree:
    """A fixed unit vector with every entry nonzero (and real), for fresh shadow residuals:
    entry k of leaf i is cos(a_i + 0.7·k), a_i = 1 + 3.1·i, over the norm of the whole tree.

    The norm is known in closed form, Σ_{k<n} cos²(a + b·k) = n/2 + sin(n·b)·cos(2a + (n−1)·b)
    / (2·sin b), so each leaf is one elementwise kernel (a reduction and a division would be
    two more for XLA to compile).
    """
    leaves, treedef = jax.tree.flatten(like)
    starts = [1.0 + 3.1 * i for i in range(len(leaves))]
    squares = sum(
        leaf.size / 2
        + math.sin(0.7 * leaf.size) * math.cos(2 * a + 0.7 * (leaf.size - 1)) / (2 * math.sin(0.7))
        for a, leaf in zip(starts, leaves)
    )
    norm = math.sqrt(squares) if squares > 0 else 1.0
    spread = [
        (jnp.cos(a + 0.7 * jnp.arange(leaf.size, dtype=jnp.finfo(leaf.dtype).dtype)) / norm)
        .astype(leaf.dtype)
        .reshape(leaf.shape)
        for a, leaf in zip(starts, leaves)
    ]
    return jax.tree.unflatten(treedef, spread)


class _GMRESState(NamedTuple):
    x: PyTree
    r: PyTree  # b − A·x, computed with a product at the end of each cycle
    norm_r: jax.Array


@dataclasses.dataclass(frozen=True)
class GMRES(AbstractIterativeLinearSolver):
    """Restarted GMRES (Saad & Schultz 1986), right-preconditioned: minimises ‖b − A·x‖₂ over a
    Krylov space of dimension `restart`, then restarts from the new x. General nonsymmetric A.

    One step of the driver is one cycle. Gram–Schmidt is applied twice per Arnoldi step, and
    Givens rotations give the residual at every step, so a cycle ends as soon as the tolerance
    is met. Each cycle ends by recomputing the true residual, which starts the next one: a
    cycle that stopped on a Givens estimate that the true residual does not confirm (a
    singular or inconsistent system) runs on, and is reported if it never gets there.

    Attributes:
        rtol, atol, max_steps: as for `CG`.
        restart: Krylov dimension per cycle (memory: restart + 1 vectors).
        preconditioner: None, or a callable v ↦ M⁻¹v with M ≈ A.
    """

    restart: int = 32
    preconditioner: Callable | None = None

    def __post_init__(self):
        super().__post_init__()
        set_checked(self, "restart", check_positive_int("GMRES", "restart", self.restart))
        check_callable("GMRES", "preconditioner", self.preconditioner, _PRECONDITIONER)

    def init(self, matvec, b):
        return _GMRESState(tree_zeros_like(b), b, tree_norm(b))

    def step(self, matvec, b, state, budget):
        m = self.restart
        precondition = self.preconditioner or _identity
        x, r, beta = state
        dtype = tree_vdot(r, r).dtype

        def project(basis, w):  # Vᴴ·w = conj(Vᵀ·conj(w)) (conj is free on real arrays)
            return sum(
                jnp.conj(
                    jnp.tensordot(vl.reshape(m + 1, -1), jnp.conj(wl).reshape(-1), axes=1)
                ).astype(dtype)
                for vl, wl in zip(jax.tree.leaves(basis), jax.tree.leaves(w))
            )

        def combine(coefficients, basis):  # V·c
            return jax.tree.map(
                lambda vl: jnp.tensordot(coefficients.astype(vl.dtype), vl, axes=1), basis
            )

        def arnoldi_step(inner):
            basis, columns, g, cs, sn, j = inner
            w = matvec(precondition(jax.tree.map(lambda vl: vl[j], basis)))
            h = project(basis, w)
            w = tree_sub(w, combine(h, basis))
            correction = project(basis, w)
            w = tree_sub(w, combine(correction, basis))
            h_next = tree_norm(w)
            safe = jnp.where(h_next > 0, h_next, 1)
            basis = jax.tree.map(
                lambda vl, wl: lax.dynamic_update_index_in_dim(
                    vl, (wl / safe.astype(wl.dtype)).astype(vl.dtype), j + 1, 0
                ),
                basis,
                w,
            )
            h = jnp.where(
                jnp.arange(m + 1, dtype=jnp.int32) == j + 1, h_next.astype(dtype), h + correction
            )

            # The i-th Givens rotation on rows i, i + 1: the unitary [[c, s], [−s̄, c̄]], with
            # c = h̄_j / ρ and s = h̄_k / ρ (ρ = √(|h_j|² + |h_k|²)), which maps (h_j, h_k) to
            # (ρ, 0); for real h, the usual real rotation.
            def rotate(i, h):
                hi, hk = lax.dynamic_slice_in_dim(h, i, 2)
                c, s = cs[i], sn[i]
                rotated = jnp.stack([c * hi + s * hk, jnp.conj(c) * hk - jnp.conj(s) * hi])
                return lax.dynamic_update_slice_in_dim(h, rotated, i, 0)

            h = lax.fori_loop(0, j, rotate, h)
            hj, hk = lax.dynamic_slice_in_dim(h, j, 2)
            radius = jnp.hypot(jnp.abs(hj), jnp.abs(hk))
            nonzero = radius > 0
            safe = jnp.where(nonzero, radius, 1).astype(dtype)
            c = jnp.where(nonzero, jnp.conj(hj) / safe, 1)
            s = jnp.where(nonzero, jnp.conj(hk) / safe, 0)
            h = lax.dynamic_update_slice_in_dim(
                h, jnp.stack([radius, jnp.zeros_like(radius)]).astype(dtype), j, 0
            )
            gj = g[j]
            g = lax.dynamic_update_slice_in_dim(g, jnp.stack([c * gj, -jnp.conj(s) * gj]), j, 0)
            columns = lax.dynamic_update_index_in_dim(columns, h[:m], j, 0)
            at_j = jnp.arange(m, dtype=jnp.int32) == j
            cs, sn = jnp.where(at_j, c, cs), jnp.where(at_j, s, sn)
            return basis, columns, g, cs, sn, j + 1

        def inner_cond(inner):
            g, j = inner[2], inner[5]
            # One product stays in the budget for the true residual that ends the cycle.
            return (j < m) & budget.keep_going(jnp.abs(g[j]), j + 1)

        safe_beta = jnp.where(beta > 0, beta, 1)
        basis = jax.tree.map(
            lambda rl: lax.dynamic_update_index_in_dim(
                jnp.zeros((m + 1, *rl.shape), rl.dtype), rl / safe_beta.astype(rl.dtype), 0, 0
            ),
            r,
        )
        inner = (
            basis,
            jnp.zeros((m, m), dtype),  # row k: the k-th column of the rotated Hessenberg R
            jnp.zeros(m + 1, dtype).at[0].set(beta.astype(dtype)),
            jnp.zeros(m, dtype),
            jnp.zeros(m, dtype),
            jnp.zeros((), jnp.int32),
        )
        axes = tree_varying_axes(b, r)
        basis, columns, g, _, _, j = while_loop(inner_cond, arnoldi_step, inner, axes)
        # A zero on R's diagonal (an Arnoldi step that found A·v in the span so far, on a
        # singular A) would divide by zero: that direction is dropped, the cycle's x stays
        # finite, and the true residual that ends the cycle tells whether it solved anything.
        active = (jnp.arange(m, dtype=jnp.int32) < j) & (jnp.diagonal(columns) != 0)
        upper = jnp.where(active[:, None] & active[None, :], columns.T, jnp.eye(m, dtype=dtype))
        y = jsl.solve_triangular(upper, jnp.where(active, g[:m], 0), lower=False)
        update = precondition(combine(y, jax.tree.map(lambda vl: vl[:m], basis)))
        x = tree_add(x, update)
        r = tree_sub(b, matvec(x))
        norm_r = tree_norm(r)
        return _GMRESState(x, r, norm_r), norm_r, j + 1

    def solution(self, state):
        return state.x


class _NeumannState(NamedTuple):
    x: PyTree
    r: PyTree


@dataclasses.dataclass(frozen=True)
class Neumann(AbstractIterativeLinearSolver):
    """Successive approximation x ← x + (b − A·x): the Neumann series for A = I − J.

    For a fixed point x = f(x, θ) with contractive J = ∂f/∂x this is Christianson's two-phase
    reverse accumulation (fax's `two_phase_solve`): the adjoint iterates at the rate of the
    forward iteration, one Jacobian product per step. It diverges when ‖J‖ ≥ 1.

    Attributes:
        rtol, atol, max_steps: as for `CG`.
    """

    def init(self, matvec, b):
        return _NeumannState(tree_zeros_like(b), b)

    def step(self, matvec, b, state, budget):
        x, r = state
        x = tree_add(x, r)
        r = tree_sub(r, matvec(r))  # b − A·(x + r), exactly
        return _NeumannState(x, r), tree_norm(r), 1

    def solution(self, state):
        return state.x
