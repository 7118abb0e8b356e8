"""Derivatives of root_solve and fixed_point_solve: finite differences to third order (float64),
closed forms, and plain unrolled differentiation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from problems import (
    A,
    B,
    N,
    W,
    ridge_closed_form,
    ridge_residual,
    spd_residual,
    tanh_map,
    unrolled_tanh,
)

import implicax
from implicax.testing import check_against_unrolled, check_derivatives

FORWARD = {
    "FixedPointIteration": implicax.FixedPointIteration(max_steps=2000),
    "Anderson": implicax.Anderson(),
    "Broyden": implicax.Broyden(),
    "Newton": implicax.Newton(),
}
LINEAR = {
    "GMRES": implicax.GMRES(),
    "BiCGStab": implicax.BiCGStab(),
    "Neumann": implicax.Neumann(max_steps=2000),
    "Dense": implicax.Dense(),
    "callable": lambda matvec, b: jnp.linalg.solve(jax.jacfwd(matvec)(b), b),
}
# The Jacobian of `spd_residual` is symmetric positive definite, so CG applies to root_solve.
ROOT_LINEAR = {**LINEAR, "CG": implicax.CG()}


def fixed_point(b, solver, linear_solver):
    return implicax.fixed_point_solve(
        tanh_map, jnp.zeros(N), (W, b), solver=solver, linear_solver=linear_solver
    )


def root(a, solver, linear_solver):
    return implicax.root_solve(
        spd_residual, jnp.zeros(N), a, solver=solver, linear_solver=linear_solver
    )


def third_order(f, *args):
    check_grads(jax.jit(f), args, order=3, modes=("fwd", "rev"))


# Third order, in both modes, for each entry point × forward family (with the Neumann backward
# solve, the cheapest to compile) and for each linear solver (with one family). The rule depends
# on the forward family only through the solution and on the linear solver through every
# tangent and adjoint solve, so this covers every component at third order; the full product
# of entry points × families × linear solvers is checked at first order by
# `test_every_combination`. (The full product at third order takes over 20 minutes to compile
# on two cores, over the suite's budget.)
@pytest.mark.parametrize("family", FORWARD)
def test_fixed_point_third_order_per_family(family):
    third_order(lambda b: fixed_point(b, FORWARD[family], implicax.Neumann()), B)


@pytest.mark.parametrize("family", FORWARD)
def test_root_third_order_per_family(family):
    third_order(lambda a: root(a, FORWARD[family], implicax.Neumann()), A)


@pytest.mark.parametrize("linear", ["GMRES", "BiCGStab", "Dense", "callable"])
def test_fixed_point_third_order_per_linear_solver(linear):
    third_order(lambda b: fixed_point(b, FORWARD["FixedPointIteration"], LINEAR[linear]), B)


def test_root_third_order_with_cg():
    third_order(lambda a: root(a, FORWARD["FixedPointIteration"], implicax.CG()), A)


@pytest.mark.parametrize("family", FORWARD)
@pytest.mark.parametrize("linear", ROOT_LINEAR)
def test_every_combination(family, linear):
    solver = FORWARD[family]
    if linear != "CG":
        jac = jax.jit(jax.jacrev(lambda b: fixed_point(b, solver, LINEAR[linear])))(B)
        expected = jax.jacrev(lambda b: unrolled_tanh((W, b)))(B)
        np.testing.assert_allclose(jac, expected, rtol=1e-8, atol=1e-10)
    jac = jax.jit(jax.jacfwd(lambda a: root(a, solver, ROOT_LINEAR[linear])))(A)
    x = root(A, solver, ROOT_LINEAR[linear])
    # Implicit function theorem by hand: dx/da = (∂F/∂x)⁻¹ since ∂F/∂a = −I.
    expected = jnp.linalg.inv(jax.jacfwd(spd_residual)(x, A))
    np.testing.assert_allclose(jac, expected, rtol=1e-8, atol=1e-10)


def test_ridge_matches_closed_form_to_third_order():
    def solve(log_lambda):
        return implicax.root_solve(
            ridge_residual, jnp.zeros(N), log_lambda, linear_solver=implicax.CG()
        )

    log_lambda = jnp.asarray(0.3)
    for derivative in (lambda f: f, jax.jacfwd, lambda f: jax.jacrev(jax.jacfwd(f))):
        np.testing.assert_allclose(
            derivative(jax.jacrev(solve))(log_lambda),
            derivative(jax.jacrev(ridge_closed_form))(log_lambda),
            rtol=1e-8,
        )


def test_matches_unrolled_iteration():
    check_against_unrolled(tanh_map, jnp.zeros(N), (W, B), steps=300)


def test_hessian_and_mixed_compositions_match_unrolled():
    def implicit(b):
        return jnp.sum(fixed_point(b, implicax.Anderson(), implicax.GMRES()) ** 2)

    def unrolled(b):
        return jnp.sum(unrolled_tanh((W, b)) ** 2)

    for transform in (
        jax.hessian,
        lambda f: jax.jacfwd(jax.grad(f)),
        lambda f: jax.grad(lambda b: jnp.sum(jax.grad(f)(b) ** 3)),
    ):
        np.testing.assert_allclose(
            jax.jit(transform(implicit))(B), transform(unrolled)(B), rtol=1e-8, atol=1e-10
        )


def test_gradient_reaches_closed_over_arrays():
    def loss(w, b):
        return jnp.sum(
            implicax.fixed_point_solve(lambda x, p: jnp.tanh(w @ x + p), jnp.zeros(N), b)
        )

    def unrolled(w, b):
        return jnp.sum(unrolled_tanh((w, b)))

    got = jax.grad(loss, argnums=(0, 1))(W, B)
    expected = jax.grad(unrolled, argnums=(0, 1))(W, B)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-8, atol=1e-12)
    check_grads(jax.jit(lambda w: loss(w, B)), (W,), order=1, modes=("fwd", "rev"))


def test_derivative_with_respect_to_x0_is_zero():
    grad = jax.grad(lambda x0: jnp.sum(implicax.fixed_point_solve(tanh_map, x0, (W, B))))(
        jnp.ones(N)
    )
    np.testing.assert_array_equal(grad, jnp.zeros(N))


def test_pytree_unknowns_and_params():
    def fn(x, p):
        return {"u": jnp.tanh(p["a"] * x["v"] + 1.0), "v": 0.5 * jnp.cos(x["u"]) * p["c"][0]}

    x0 = {"u": jnp.zeros(2), "v": jnp.zeros(2)}
    params = {"a": jnp.array([0.3, -0.2]), "c": (jnp.array(0.7),)}

    def unrolled(p):
        return jax.lax.fori_loop(0, 200, lambda _, x: fn(x, p), x0)

    def implicit(p):
        return implicax.fixed_point_solve(fn, x0, p)

    got, expected = jax.jacrev(implicit)(params), jax.jacrev(unrolled)(params)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(g, e, rtol=1e-8, atol=1e-12)
    check_derivatives(implicit, (params,), order=2)


def test_non_differentiable_callable_solver():
    def host_solver(fn, x0, params):
        # A forward solver JAX cannot trace through: iteration in NumPy on the host.
        def iterate(x0, w, b):
            x = np.asarray(x0)
            for _ in range(200):
                x = np.tanh(np.asarray(w) @ x + np.asarray(b))
            return x.astype(x0.dtype)

        w, b = params
        shape = jax.ShapeDtypeStruct(x0.shape, x0.dtype)
        return jax.pure_callback(iterate, shape, x0, w, b, vmap_method="sequential")

    def implicit(b):
        return implicax.fixed_point_solve(tanh_map, jnp.zeros(N), (W, b), solver=host_solver)

    np.testing.assert_allclose(
        jax.jacrev(implicit)(B), jax.jacrev(lambda b: unrolled_tanh((W, b)))(B), rtol=1e-8
    )
    check_grads(implicit, (B,), order=2, modes=("fwd", "rev"))


def test_closed_over_integer_arrays_and_keys_under_differentiated_jit():
    # Non-float values closed over inside an outer jit must not leak as stale tracers.
    def solve(p, shift, key):
        noise = jax.random.normal(key, (N,))
        return implicax.fixed_point_solve(
            lambda x, p: jnp.tanh(p * x + shift.astype(x.dtype) + noise), jnp.zeros(N), p
        )

    def unrolled(p, shift, key):
        noise = jax.random.normal(key, (N,))
        step = lambda _, x: jnp.tanh(p * x + shift.astype(x.dtype) + noise)  # noqa: E731
        return jax.lax.fori_loop(0, 200, step, jnp.zeros(N))

    args = (jnp.asarray(0.5), jnp.arange(N), jax.random.key(0))
    _, vjp = jax.vjp(jax.jit(solve), *args)
    _, vjp_expected = jax.vjp(unrolled, *args)
    np.testing.assert_allclose(vjp(jnp.ones(N))[0], vjp_expected(jnp.ones(N))[0], rtol=1e-9)
    np.testing.assert_allclose(
        jax.jacfwd(lambda p: jax.jit(solve)(p, *args[1:]))(args[0]),
        jax.jacfwd(lambda p: unrolled(p, *args[1:]))(args[0]),
        rtol=1e-9,
    )
