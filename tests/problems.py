"""Small test problems with known solutions, shared by the core tests (float64)."""

import jax
import jax.numpy as jnp
import numpy as np

RNG = np.random.default_rng(0)
N = 3

# Fixed point x = tanh(W x + b): a contraction (‖W‖₂ = 0.6, |tanh'| ≤ 1).
_W = RNG.normal(size=(N, N))
W = jnp.asarray(0.6 * _W / np.linalg.norm(_W, 2))
B = jnp.asarray(RNG.normal(size=N))


def tanh_map(x, params):
    w, b = params
    return jnp.tanh(w @ x + b)


def unrolled_tanh(params, steps=200):
    return jax.lax.fori_loop(0, steps, lambda _, x: tanh_map(x, params), jnp.zeros(N))


# Root of F(x) = M x + 0.1·tanh(x) − a with M symmetric positive definite: ∂F/∂x is symmetric
# positive definite (CG applies) and x − F(x) is a contraction (every forward family applies).
_S = RNG.normal(size=(N, N))
M = jnp.asarray(0.6 * np.eye(N) + 0.1 * (_S + _S.T) / np.linalg.norm(_S + _S.T, 2))
A = jnp.asarray(RNG.normal(size=N))


def spd_residual(x, a):
    return M @ x + 0.1 * jnp.tanh(x) - a


# Ridge regression: the optimality condition (XᵀX + λI) w − Xᵀy = 0 has a closed form.
X = jnp.asarray(RNG.normal(size=(8, N)))
Y = jnp.asarray(RNG.normal(size=8))


def ridge_residual(w, log_lambda):
    return (X.T @ X + jnp.exp(log_lambda) * jnp.eye(N)) @ w - X.T @ Y


def ridge_closed_form(log_lambda):
    return jnp.linalg.solve(X.T @ X + jnp.exp(log_lambda) * jnp.eye(N), X.T @ Y)
