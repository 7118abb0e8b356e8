"""fax's example: the gradient of a matrix's dominant eigenvalue, through power iteration.

The dominant eigenvector x of A is the fixed point of x ← Ax/‖Ax‖. The Rayleigh quotient
xᵀAx/xᵀx at that fixed point is the dominant eigenvalue λ, and its gradient with respect to A is
the closed form wvᵀ/(wᵀv) (v, w the right and left eigenvectors). Run: python examples/power_iteration.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import implicax


def power_step(x, a):
    y = a @ x
    return y / jnp.linalg.norm(y)


def dominant_eigenvalue(a):
    x = implicax.fixed_point_solve(power_step, jnp.ones(a.shape[0]), a)
    return x @ a @ x / (x @ x)


def closed_form_gradient(a):
    values, right = np.linalg.eig(a)
    values_t, left = np.linalg.eig(a.T)
    v = right[:, np.argmax(values.real)].real
    w = left[:, np.argmax(values_t.real)].real
    return np.outer(w, v) / (w @ v)


def main():
    a = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    grad = jax.grad(dominant_eigenvalue)(a)
    print("dominant eigenvalue:", dominant_eigenvalue(a))
    print("gradient (implicit):\n", grad)
    print("gradient (closed form):\n", closed_form_gradient(np.asarray(a)))
    np.testing.assert_allclose(grad, closed_form_gradient(np.asarray(a)), rtol=1e-4)


if __name__ == "__main__":
    main()
