"""PhantomGradient and JacobianFree: inexact implicit gradients, checked against the unrolled
formulas they stand for (float64), in both modes, on pytrees, under jit, vmap and pmap; the
Jacobian penalty and spectral radius against jacfwd and eig."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import implicax

W = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4)) * 0.3)


def g(z, theta):
    return jnp.tanh(W @ z + theta)


def loss(z):
    return jnp.sum(jnp.sin(z) * jnp.arange(1.0, 5.0))


THETA = jnp.asarray([0.3, -0.2, 0.5, 0.1])
Z0 = jnp.zeros(4)


def phantom(fn, theta, steps, damping):
    """The definition: k damped iterations from the solution, held constant."""
    z_star = lax.stop_gradient(implicax.fixed_point_solve(fn, Z0, theta))
    z = z_star
    for _ in range(steps):
        z = (1 - damping) * z + damping * fn(z, theta)
    return z


@pytest.mark.parametrize("steps, damping", [(1, 1.0), (1, 0.5), (5, 0.5), (12, 0.8)])
def test_phantom_gradient_is_the_unrolled_damped_iteration(steps, damping):
    solver = implicax.PhantomGradient(steps, damping)
    through_solve = lambda t: loss(implicax.fixed_point_solve(g, Z0, t, linear_solver=solver))  # noqa: E731
    unrolled = lambda t: loss(phantom(g, t, steps, damping))  # noqa: E731
    np.testing.assert_allclose(jax.grad(through_solve)(THETA), jax.grad(unrolled)(THETA), rtol=1e-9)
    np.testing.assert_allclose(  # forward mode too
        jax.jacfwd(through_solve)(THETA), jax.jacfwd(unrolled)(THETA), rtol=1e-9
    )


def test_jacobian_free_is_the_map_differentiated_at_the_fixed_point():
    through_solve = lambda t: loss(  # noqa: E731
        implicax.fixed_point_solve(g, Z0, t, linear_solver=implicax.JacobianFree())
    )

    def definition(t):
        z_star = lax.stop_gradient(implicax.fixed_point_solve(g, Z0, t))
        return loss(g(z_star, t))

    np.testing.assert_allclose(
        jax.grad(through_solve)(THETA), jax.grad(definition)(THETA), rtol=1e-9
    )
    np.testing.assert_allclose(
        jax.jacfwd(through_solve)(THETA), jax.jacfwd(definition)(THETA), rtol=1e-9
    )


def test_many_steps_approach_the_exact_gradient():
    exact = jax.grad(lambda t: loss(implicax.fixed_point_solve(g, Z0, t)))(THETA)
    errors = []
    for steps in (2, 8, 40):
        solver = implicax.PhantomGradient(steps, 1.0)
        grad = jax.grad(
            lambda t, s=solver: loss(implicax.fixed_point_solve(g, Z0, t, linear_solver=s))
        )
        errors.append(float(jnp.linalg.norm(grad(THETA) - exact)))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-9 * float(jnp.linalg.norm(exact))


def test_a_root_problem_uses_the_map_x_minus_residual():
    # F(x) = x − g(x) as a root problem: the same phantom gradient as the fixed point.
    solver = implicax.PhantomGradient(4, 0.6)
    root = lambda t: loss(  # noqa: E731
        implicax.root_solve(lambda z, t: z - g(z, t), Z0, t, linear_solver=solver)
    )
    np.testing.assert_allclose(
        jax.grad(root)(THETA), jax.grad(lambda t: loss(phantom(g, t, 4, 0.6)))(THETA), rtol=1e-9
    )


def test_pytrees_jit_and_vmap():
    def g_tree(z, theta):
        return {"a": jnp.tanh(0.4 * z["b"] + theta), "b": 0.5 * jnp.cos(z["a"])}

    z0 = {"a": jnp.zeros(3), "b": jnp.zeros(3)}
    solver = implicax.PhantomGradient(3, 0.7)

    def through_solve(t):
        z = implicax.fixed_point_solve(g_tree, z0, t, linear_solver=solver)
        return jnp.sum(z["a"] ** 2) + jnp.sum(z["b"])

    def unrolled(t):
        z = lax.stop_gradient(implicax.fixed_point_solve(g_tree, z0, t))
        for _ in range(3):
            z = jax.tree.map(lambda u, v: 0.3 * u + 0.7 * v, z, g_tree(z, t))
        return jnp.sum(z["a"] ** 2) + jnp.sum(z["b"])

    thetas = jnp.asarray([[0.1, 0.2, 0.3], [-0.5, 0.0, 0.4]])
    np.testing.assert_allclose(
        jax.jit(jax.vmap(jax.grad(through_solve)))(thetas),
        jax.vmap(jax.grad(unrolled))(thetas),
        rtol=1e-9,
    )


def test_inexact_is_not_a_failure_but_a_nan_is():
    solver = implicax.PhantomGradient(1, 0.5)  # far from the exact solve
    grad = jax.grad(
        lambda t: loss(
            implicax.fixed_point_solve(g, Z0, t, linear_solver=solver, on_failure="raise")
        )
    )
    assert np.all(np.isfinite(grad(THETA)))  # no error raised
    x, stats = solver.solve(lambda v: 2 * v, jnp.ones(3).at[1].set(jnp.nan))
    assert bool(stats.diverged) and not bool(stats.converged)
    x, stats = implicax.JacobianFree().solve(lambda v: 2 * v, jnp.ones(3))
    assert bool(stats.converged) and int(stats.steps) == 0
    np.testing.assert_array_equal(x, jnp.ones(3))


def test_options_are_checked():
    with pytest.raises(ValueError, match="steps"):
        implicax.PhantomGradient(0)
    with pytest.raises(ValueError, match="damping"):
        implicax.PhantomGradient(3, 0.0)
    with pytest.raises(TypeError, match="damping"):
        implicax.PhantomGradient(3, "0.5")
    assert implicax.PhantomGradient(np.int64(2), np.float32(0.25)).steps == 2


# --- Jacobian regularisation and the spectral radius ------------------------------------------

S = np.random.default_rng(1).standard_normal((4, 4))
W_SYMMETRIC = jnp.asarray(0.4 * (S + S.T) / 2)


def g_symmetric(z, theta):
    return jnp.tanh(W_SYMMETRIC @ z + theta)


def _exact_penalty(fn, z, theta):
    jacobian = jax.jacfwd(fn)(z, theta)
    return jnp.sum(jacobian**2) / z.size


def test_the_jacobian_penalty_is_unbiased():
    z = jnp.asarray([0.1, -0.3, 0.2, 0.5])
    exact = float(_exact_penalty(g, z, THETA))
    draws = 4000
    estimate = float(implicax.jacobian_penalty(g, z, THETA, jax.random.key(0), samples=draws))
    # Var ‖Jᵀε‖² = 2‖JJᵀ‖_F² for Gaussian ε: allow five standard errors.
    jacobian = jax.jacfwd(g)(z, THETA)
    error = float(jnp.sqrt(2 * jnp.sum((jacobian @ jacobian.T) ** 2) / draws)) / z.size
    assert abs(estimate - exact) < 5 * error, (estimate, exact, error)
    # Its gradient w.r.t. the parameters is the exact penalty's, in expectation.
    grad = jax.grad(lambda t: implicax.jacobian_penalty(g, z, t, jax.random.key(1), samples=draws))
    exact_grad = jax.grad(lambda t: _exact_penalty(g, z, t))(THETA)
    np.testing.assert_allclose(
        grad(THETA), exact_grad, atol=0.1 * float(jnp.max(jnp.abs(exact_grad)))
    )


def test_the_jacobian_penalty_of_a_linear_map_on_a_pytree():
    # fn(z) = (2·a, 3·b + a): ‖J‖_F² = 4·3 + 9·2 + 1·2 over n = 5 entries, per draw in mean.
    fn = lambda z, _: {"a": 2 * z["a"], "b": 3 * z["b"] + z["a"][:2]}  # noqa: E731
    z = {"a": jnp.ones(3), "b": jnp.ones(2)}
    penalties = jax.vmap(lambda k: implicax.jacobian_penalty(fn, z, None, k, samples=64))(
        jax.random.split(jax.random.key(2), 200)
    )
    np.testing.assert_allclose(float(jnp.mean(penalties)), (12 + 18 + 2) / 5, rtol=0.03)


def test_the_spectral_radius_of_a_dominant_real_eigenvalue():
    # J = diag(1 − tanh²)·W with W symmetric: similar to a symmetric matrix, real eigenvalues.
    z = jnp.asarray([0.2, -0.1, 0.4, 0.3])
    jacobian = np.asarray(jax.jacfwd(g_symmetric)(z, THETA))
    exact = np.max(np.abs(np.linalg.eigvals(jacobian)))
    radius = jax.jit(lambda z, t, k: implicax.spectral_radius(g_symmetric, z, t, k, steps=300))(
        z, THETA, jax.random.key(3)
    )
    np.testing.assert_allclose(float(radius), exact, rtol=1e-6)
    # The linear map 0.9·e1e1ᵀ + 0.5·(I − e1e1ᵀ) on a pytree: radius 0.9.
    fn = lambda z, _: {"a": 0.9 * z["a"], "b": 0.5 * z["b"]}  # noqa: E731
    z = {"a": jnp.ones(()), "b": jnp.ones(3)}
    radius = implicax.spectral_radius(fn, z, None, jax.random.key(4), steps=80)
    np.testing.assert_allclose(float(radius), 0.9, rtol=1e-9)


def test_regulariser_inputs_are_checked():
    with pytest.raises(ValueError, match="tree like z"):
        implicax.jacobian_penalty(lambda z, p: z[:2], jnp.ones(3), None, jax.random.key(0))
    with pytest.raises(TypeError, match="callable"):
        implicax.spectral_radius(None, jnp.ones(3), None, jax.random.key(0))
    with pytest.raises(ValueError, match="samples"):
        implicax.jacobian_penalty(g, Z0, THETA, jax.random.key(0), samples=0)
    with pytest.raises(TypeError, match="floating"):
        implicax.spectral_radius(g, jnp.ones(4, jnp.int32), THETA, jax.random.key(0))


def test_the_toolkit_under_pmap():
    """Per device: the phantom and Jacobian-free gradients equal their definitions, and the
    penalty and radius equal the same estimates computed outside pmap."""
    devices = jax.local_device_count()
    thetas = jnp.stack([THETA * (1 + 0.3 * i) for i in range(devices)])
    keys = jax.random.split(jax.random.key(5), devices)
    solver = implicax.PhantomGradient(4, 0.6)

    def per_device(theta, key):
        phantom_grad = jax.grad(
            lambda t: loss(implicax.fixed_point_solve(g, Z0, t, linear_solver=solver))
        )(theta)
        free_grad = jax.grad(
            lambda t: loss(
                implicax.fixed_point_solve(g, Z0, t, linear_solver=implicax.JacobianFree())
            )
        )(theta)
        z = implicax.fixed_point_solve(g_symmetric, Z0, theta)
        penalty = implicax.jacobian_penalty(g_symmetric, z, theta, key, samples=8)
        radius = implicax.spectral_radius(g_symmetric, z, theta, key, steps=50)
        return phantom_grad, free_grad, penalty, radius

    mapped = jax.pmap(per_device)(thetas, keys)
    for i in range(devices):
        theta, key = thetas[i], keys[i]
        phantom_grad, free_grad, penalty, radius = (value[i] for value in mapped)
        np.testing.assert_allclose(
            phantom_grad, jax.grad(lambda t: loss(phantom(g, t, 4, 0.6)))(theta), rtol=1e-9
        )
        z_star = implicax.fixed_point_solve(g, Z0, theta)
        np.testing.assert_allclose(
            free_grad, jax.grad(lambda t, z=z_star: loss(g(z, t)))(theta), rtol=1e-9
        )
        z = implicax.fixed_point_solve(g_symmetric, Z0, theta)
        np.testing.assert_allclose(
            penalty, implicax.jacobian_penalty(g_symmetric, z, theta, key, samples=8), rtol=1e-9
        )
        np.testing.assert_allclose(
            radius, implicax.spectral_radius(g_symmetric, z, theta, key, steps=50), rtol=1e-9
        )
