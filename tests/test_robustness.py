"""Regression tests for real problem structure: pytree leaves the differentiated inputs do not
reach, undifferentiated inputs, and dtype promotion. Each case crashed or did needless work
before its fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicax
from implicax.testing import check_derivatives

# --- a leaf whose residual does not depend on the differentiated inputs ---------------------


def _blocks(v, lam):
    """u·(1 + λ) = 1 and 2w = 1: only u depends on λ."""
    return {"u": v["u"] * (1 + lam) - 1.0, "w": v["w"] * 2.0 - 1.0}


V0 = {"u": jnp.zeros(3), "w": jnp.zeros(2)}


def _total(lam):
    v = implicax.root_solve(_blocks, V0, lam)
    return v["u"].sum() + v["w"].sum()  # 3 / (1 + λ) + 1


TRANSFORMS = {
    "grad": (jax.grad, 1),
    "jacrev": (jax.jacrev, 1),
    "jacfwd": (jax.jacfwd, 1),
    "hessian": (jax.hessian, 2),
    "jacfwd-jacrev": (lambda f: jax.jacfwd(jax.jacrev(f)), 2),
    "jacrev-jacfwd": (lambda f: jax.jacrev(jax.jacfwd(f)), 2),
    "jacrev-jacrev-jacrev": (lambda f: jax.jacrev(jax.jacrev(jax.jacrev(f))), 3),
    "jacfwd-hessian": (lambda f: jax.jacfwd(jax.hessian(f)), 3),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_a_leaf_the_inputs_do_not_reach_in_every_mode(name):
    transform, order = TRANSFORMS[name]
    lam = 0.5
    # d^k/dλ^k 3/(1 + λ) = 3·(−1)^k·k! / (1 + λ)^(k+1)
    expected = 3 * (-1) ** order * np.prod(np.arange(1, order + 1)) / (1 + lam) ** (order + 1)
    np.testing.assert_allclose(transform(_total)(lam), expected, rtol=1e-10)


def _ridge_optimality(wb, params):
    """Gradient of ½‖Xw + b − y‖² + ½λ‖w‖²: the bias b is not penalised."""
    lam, X, y = params
    r = X @ wb["w"] + wb["b"] - y
    return {"w": X.T @ r + lam * wb["w"], "b": jnp.sum(r)}


def _ridge_data():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.standard_normal((8, 3))), jnp.asarray(rng.standard_normal(8))


def test_ridge_with_an_unpenalised_bias_matches_the_normal_equations():
    X, y = _ridge_data()
    wb0 = {"w": jnp.zeros(3), "b": jnp.zeros(())}

    def solved(lam):
        wb = implicax.root_solve(_ridge_optimality, wb0, (lam, X, y))
        return jnp.concatenate([wb["w"], wb["b"][None]])

    def closed_form(lam):
        A = jnp.concatenate([X, jnp.ones((8, 1))], axis=1)
        penalty = jnp.diag(jnp.array([1.0, 1.0, 1.0, 0.0])) * lam
        return jnp.linalg.solve(A.T @ A + penalty, A.T @ y)

    lam = 0.7
    for transform in (jax.jacrev, jax.jacfwd, lambda f: jax.jacrev(jax.jacrev(f))):
        np.testing.assert_allclose(transform(solved)(lam), transform(closed_form)(lam), rtol=1e-8)
    check_derivatives(lambda lam: solved(lam), (jnp.asarray(lam),), order=2, transforms=("none",))


def test_the_gradient_with_respect_to_one_of_two_hyperparameters():
    def fn(v, params):
        a, b = params
        return {"p": v["p"] * (1 + a) - 1.0, "q": v["q"] * (2 + b) - v["p"]}

    v0 = {"p": jnp.zeros(2), "q": jnp.zeros(2)}

    def loss(a, b):
        v = implicax.root_solve(fn, v0, (a, b))
        return jnp.sum(v["p"]) + jnp.sum(v["q"])  # 2/(1+a) + 2/((1+a)(2+b))

    a, b = 0.3, 0.4
    expected_a = -2 / (1 + a) ** 2 - 2 / ((1 + a) ** 2 * (2 + b))
    expected_b = -2 / ((1 + a) * (2 + b) ** 2)
    np.testing.assert_allclose(jax.grad(loss, argnums=0)(a, b), expected_a, rtol=1e-10)
    np.testing.assert_allclose(jax.grad(loss, argnums=1)(a, b), expected_b, rtol=1e-10)
    # Only b: p's residual does not depend on it.
    np.testing.assert_allclose(
        jax.jacrev(jax.grad(loss, argnums=1), argnums=1)(a, b),
        4 / ((1 + a) * (2 + b) ** 3),
        rtol=1e-10,
    )


def test_undifferentiated_inputs_cost_no_derivative_work():
    """A parameter that is not differentiated never has its tangent formed."""
    seen = []

    @jax.custom_jvp
    def tap(w):
        return w

    @tap.defjvp
    def _tap_jvp(primals, tangents):
        seen.append(True)
        return tap(primals[0]), tangents[0]

    rng = np.random.default_rng(1)
    W = jnp.asarray(rng.standard_normal((4, 4))) * 0.2
    x = jnp.asarray(rng.standard_normal(4))
    fn = lambda z, p: jnp.tanh(tap(p[0]) @ z + p[1])  # noqa: E731
    loss = lambda W, x: jnp.sum(implicax.fixed_point_solve(fn, jnp.zeros(4), (W, x)))  # noqa: E731

    jax.grad(loss, argnums=1)(W, x)
    jax.jacfwd(loss, argnums=1)(W, x)
    jax.hessian(loss, argnums=1)(W, x)
    assert not seen
    jax.grad(loss, argnums=0)(W, x)  # the check itself works: differentiating W forms it
    assert seen
