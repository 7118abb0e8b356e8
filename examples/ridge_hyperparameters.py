"""Tune a ridge penalty by gradient descent on validation loss, differentiating through the
solution of the training problem's optimality condition (XᵀX + λI)w = Xᵀy.

The inner solution w*(λ) comes from `root_solve` on the gradient of the training objective; its
Jacobian is the (symmetric positive definite) Hessian, so the backward solve uses CG.
Run: python examples/ridge_hyperparameters.py [--steps N]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import implicax


def make_data(seed=0, n_train=60, n_valid=200, dim=30, noise=2.0):
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=dim)
    x = rng.normal(size=(n_train + n_valid, dim))
    y = x @ w_true + noise * rng.normal(size=n_train + n_valid)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def training_gradient(w, args):
    """∇_w of ½‖Xw − y‖² + ½λ‖w‖², λ = exp(log_lambda): zero at the ridge solution."""
    log_lambda, (x, y) = args
    return x.T @ (x @ w - y) + jnp.exp(log_lambda) * w


def validation_loss(log_lambda, train, valid):
    w = implicax.root_solve(
        training_gradient,
        jnp.zeros(train[0].shape[1]),
        (log_lambda, train),
        solver=implicax.Newton(linear_solver=implicax.CG()),
        linear_solver=implicax.CG(),
    )
    x, y = valid
    return jnp.mean((x @ w - y) ** 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    train, valid = make_data()
    value_and_grad = jax.jit(jax.value_and_grad(validation_loss))
    log_lambda = jnp.asarray(-2.0)
    first, _ = value_and_grad(log_lambda, train, valid)
    for step in range(args.steps):
        loss, grad = value_and_grad(log_lambda, train, valid)
        log_lambda = log_lambda - 0.5 * grad
        if step % 10 == 0:
            print(
                f"step {step:3d}  λ = {float(jnp.exp(log_lambda)):8.3f}  validation MSE = {float(loss):.4f}"
            )
    loss, _ = value_and_grad(log_lambda, train, valid)
    print(
        f"final λ = {float(jnp.exp(log_lambda)):.3f}, validation MSE {float(first):.4f} → {float(loss):.4f}"
    )
    assert loss <= first


if __name__ == "__main__":
    main()
