"""The toolkit for training deep equilibrium models: inexact gradients, Jacobian
regularisation and a contraction monitor.

The implicit derivative of a fixed point z* = g(z*, θ) applies (I − ∂g/∂z)⁻¹, one linear
solve per derivative. DEQ training often does well with a cheaper operator in its place:

- `PhantomGradient` (Geng et al. 2021, "On Training Implicit Models"): the derivative of k
  damped iterations z ← (1 − λ)·z + λ·g(z) started at z* held constant, i.e. the truncated
  series λ·Σ_{i<k} ((1 − λ)·I + λ·∂g/∂z)^i;
- `JacobianFree` (Fung et al. 2022, "JFB: Jacobian-free backpropagation"): the identity.

Both take the place of the linear solver (``linear_solver=``), so the rest of the machinery
(forward and reverse mode, vmap, the adapters) is unchanged. For a root problem F(x) = 0 the
map is g(x) = x − F(x), so ∂g/∂x = I − A with A = ∂F/∂x, the operator they are given.

`jacobian_penalty` (Bai et al. 2021, "Stabilizing Equilibrium Models by Jacobian
Regularization") estimates ‖∂g/∂z‖_F² at z*, a training penalty that keeps the forward solve
short; `spectral_radius` estimates the contraction rate, for monitoring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ._failure import make_stats
from ._linear import AbstractLinearSolver
from ._options import check_fraction, check_positive_int, set_checked
from ._tree import (
    PyTree,
    all_finite,
    check_floating,
    real_dtype,
    tree_add,
    tree_scale,
    tree_sub,
    tree_vdot,
)


@dataclasses.dataclass(frozen=True)
class PhantomGradient(AbstractLinearSolver):
    """The phantom gradient: k = `steps` damped fixed-point iterations, differentiated from
    the solution held constant, in place of the exact implicit derivative.

    With A = I − ∂g/∂z the operator of the derivative's linear system A·x = b, it returns
    x = λ·Σ_{i<k} (I − λ·A)^i·b, after k − 1 matrix-vector products (the first term needs
    none): exactly the tangent (and, applied to the transposed operator, the cotangent) of
    z_{i+1} = (1 − λ)·z_i + λ·g(z_i, θ) from z_0 = stop_gradient(z*). As k grows with
    λ·A contractive it tends to the exact solve; k = 1 gives λ·b, the Jacobian-free gradient
    scaled by λ.

    Inexact by design, so its result is never reported as a failed solve for being inexact;
    it is reported when it is not finite (`SolveStats.diverged`). `residual_norm` is NaN:
    measuring it would cost a product. Higher derivatives use the same substitution at
    every order (they are not those of the unrolled iteration differentiated twice).

    Attributes:
        steps: k, the number of damped iterations (≥ 1).
        damping: λ in (0, 1].
    """

    steps: int = 5
    damping: float = 0.5

    def __post_init__(self):
        set_checked(self, "steps", check_positive_int("PhantomGradient", "steps", self.steps))
        set_checked(self, "damping", check_fraction("PhantomGradient", "damping", self.damping))

    def solve(self, matvec, b):
        def iterate(_, x):  # x + λ·(b − A·x)
            return tree_add(x, tree_scale(self.damping, tree_sub(b, matvec(x))))

        x = lax.fori_loop(1, self.steps, iterate, tree_scale(self.damping, b))
        finite = all_finite(x)
        return x, make_stats(self.steps - 1, _unmeasured(b), finite, ~finite)


@dataclasses.dataclass(frozen=True)
class JacobianFree(AbstractLinearSolver):
    """Jacobian-free backpropagation: the derivative's linear solve A·x = b replaced by
    x = b, i.e. (I − ∂g/∂z)⁻¹ by I, at no matrix-vector product.

    For a fixed point z* = g(z*, θ) the gradient is then that of g(z*, θ) at z* held
    constant, w.r.t. θ. Inexact by design: reported only when not finite (see
    `PhantomGradient`).
    """

    def solve(self, matvec, b):
        finite = all_finite(b)
        return b, make_stats(0, _unmeasured(b), finite, ~finite)


def _unmeasured(b: PyTree) -> jax.Array:
    """The residual norm an inexact solver reports: NaN, in b's norm dtype."""
    return jnp.full((), jnp.nan, real_dtype(b))


def _normal_like(key: jax.Array, tree: PyTree) -> PyTree:
    """Independent standard normal draws shaped like each leaf of tree."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    draws = [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, draws)


def _check_map(name: str, fn: Any, z: PyTree, params: Any) -> None:
    if not callable(fn):
        raise TypeError(f"{name}: fn must be a callable fn(z, params), got {fn!r}.")
    check_floating(z, "z")
    out = jax.eval_shape(fn, z, params)
    if jax.tree.structure(out) != jax.tree.structure(z) or any(
        o.shape != leaf.shape for o, leaf in zip(jax.tree.leaves(out), jax.tree.leaves(z))
    ):
        raise ValueError(
            f"{name}: fn(z, params) must return a tree like z (the fixed-point map); got "
            f"{jax.tree.map(lambda o: o.shape, out)} for z of "
            f"{jax.tree.map(lambda leaf: leaf.shape, z)}."
        )


def jacobian_penalty(
    fn: Callable, z: PyTree, params: Any, key: jax.Array, *, samples: int = 1
) -> jax.Array:
    """A Hutchinson estimate of ‖∂fn/∂z (z, params)‖_F² / n, n the number of entries of z.

    For ε with independent standard normal entries E‖εᵀ·J‖² = ‖J‖_F², so the mean of
    ‖εᵀ·J‖² / n over `samples` draws is unbiased; one vector-Jacobian product per draw. The
    estimate is differentiable w.r.t. params (and z): add ``weight * penalty`` to a training
    loss, at z = the DEQ's solution, to keep its Jacobian small and its forward solve short
    (Bai et al. 2021 use weights of order 1 with one sample).

    Args:
        fn: the fixed-point map ``fn(z, params)``, returning a tree like z.
        z: where to take the Jacobian (usually the solution, as returned by the solve).
        params: fn's parameters.
        key: a `jax.random` key.
        samples: draws averaged (≥ 1).
    """
    samples = check_positive_int("jacobian_penalty", "samples", samples)
    _check_map("jacobian_penalty", fn, z, params)
    _, vjp = jax.vjp(lambda z: fn(z, params), z)
    size = sum(leaf.size for leaf in jax.tree.leaves(z))

    def squared(key):
        (row,) = vjp(_normal_like(key, z))
        return jnp.real(tree_vdot(row, row))

    return jnp.mean(jax.vmap(squared)(jax.random.split(key, samples))) / size


def spectral_radius(
    fn: Callable, z: PyTree, params: Any, key: jax.Array, *, steps: int = 20
) -> jax.Array:
    """A power-iteration estimate of the spectral radius of ∂fn/∂z at (z, params): the
    contraction rate of the fixed-point iteration near z (below 1: it converges).

    `steps` Jacobian-vector products from a random start; the estimate is ‖J·v‖ for the last
    unit vector v, exact in the limit when one eigenvalue is largest in modulus and real (a
    complex pair makes it oscillate within their modulus' range). For monitoring: no
    derivative flows through it.

    Args:
        fn: the fixed-point map ``fn(z, params)``, returning a tree like z.
        z: where to take the Jacobian (usually the solution).
        params: fn's parameters.
        key: a `jax.random` key.
        steps: power iterations (≥ 1).
    """
    steps = check_positive_int("spectral_radius", "steps", steps)
    _check_map("spectral_radius", fn, z, params)
    z, params = lax.stop_gradient((z, params))
    _, jvp = jax.linearize(lambda z: fn(z, params), z)

    def unit(v):
        norm = jnp.sqrt(jnp.real(tree_vdot(v, v)))
        return tree_scale(1 / jnp.where(norm > 0, norm, 1), v), norm

    def iterate(_, carry):
        v, _ = carry
        return unit(jvp(v))

    v, _ = unit(_normal_like(key, z))
    _, radius = lax.fori_loop(
        0, steps, iterate, (v, jnp.zeros((), jnp.real(tree_vdot(v, v)).dtype))
    )
    return radius
