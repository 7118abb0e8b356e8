"""Complex unknowns: every forward and linear solver on complex arrays, and the implicit
derivatives of holomorphic residuals, against closed forms and float64 central finite
differences (real and imaginary parts perturbed separately).

JAX's convention, pinned by `test_finite_difference_convention`: for a real loss L of a
complex θ = a + ib, ``jax.grad(L)(θ)`` is ∂L/∂a − i·∂L/∂b.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicax

TIGHT = dict(rtol=1e-13, atol=1e-13)  # forward solves inside finite differences


def _rng(seed=0):
    return np.random.default_rng(seed)


def _complex_normal(rng, *shape):
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


def fd_grad(loss, theta, eps=1e-6):
    """Central differences of a real loss: ∂L/∂θ for real θ, ∂L/∂a − i·∂L/∂b for θ = a + ib."""
    theta = np.asarray(theta)
    jitted = jax.jit(loss)
    loss = lambda t: float(jitted(t))  # noqa: E731
    out = np.zeros(theta.shape, theta.dtype)
    for k in np.ndindex(theta.shape):
        e = np.zeros_like(theta)
        e[k] = eps
        out[k] = (loss(theta + e) - loss(theta - e)) / (2 * eps)
        if np.iscomplexobj(theta):
            out[k] -= 1j * (loss(theta + 1j * e) - loss(theta - 1j * e)) / (2 * eps)
    return out


def fd_jvp(f, theta, tangent, eps=1e-6):
    f = jax.jit(f)
    return (f(theta + eps * tangent) - f(theta - eps * tangent)) / (2 * eps)


def test_finite_difference_convention():
    # The helper against a loss whose JAX gradient is known: |θ|² ↦ 2·conj(θ).
    theta = jnp.asarray([0.3 + 0.7j, -1.2 + 0.1j])
    np.testing.assert_allclose(fd_grad(lambda t: jnp.sum(jnp.abs(t) ** 2), theta), 2 * theta.conj())
    np.testing.assert_allclose(
        jax.grad(lambda t: jnp.sum(jnp.abs(t) ** 2))(theta), 2 * theta.conj()
    )


# --- x² = c: closed forms for the solution and every derivative ----------------------------

C = jnp.asarray([1.5 + 0.8j, -0.4 + 2.0j, 0.9 - 1.1j])  # principal square roots, Re > 0


def _sqrt(c, **kwargs):
    # From x0 = 1 + c/2 (Newton from a start with Re(x0/√c) > 0 finds the principal root).
    return implicax.root_solve(lambda x, c: x * x - c, 1 + c / 2, c, **kwargs)


def test_square_root_solution_and_holomorphic_jacobians():
    root = jnp.sqrt(C)
    np.testing.assert_allclose(_sqrt(C), root, rtol=1e-12)
    expected = jnp.diag(1 / (2 * root))  # d√c/dc
    np.testing.assert_allclose(jax.jacfwd(_sqrt, holomorphic=True)(C), expected, rtol=1e-10)
    # jacrev solves the transposed system (∂F/∂x)ᵀλ = x̄: a plain transpose, not conjugated.
    np.testing.assert_allclose(jax.jacrev(_sqrt, holomorphic=True)(C), expected, rtol=1e-10)
    tangent = jnp.asarray([0.2 - 1.0j, 1.0 + 0.0j, -0.5 + 0.5j])
    _, x_dot = jax.jvp(_sqrt, (C,), (tangent,))
    np.testing.assert_allclose(x_dot, tangent / (2 * root), rtol=1e-10)


@pytest.mark.parametrize("loss", ["abs2", "real"])
def test_square_root_real_loss_gradient(loss):
    if loss == "abs2":  # Σ|√c|² = Σ|c|: gradient conj(c)/|c|
        f, closed = lambda c: jnp.sum(jnp.abs(_sqrt(c)) ** 2), np.conj(C) / np.abs(C)
    else:  # Σ Re √c: ∂/∂a − i·∂/∂b of Re f(c) is f'(c) = 1/(2√c) for holomorphic f
        f, closed = lambda c: jnp.sum(jnp.real(_sqrt(c))), 1 / (2 * jnp.sqrt(C))
    gradient = jax.grad(f)(C)
    np.testing.assert_allclose(gradient, closed, rtol=1e-10)
    np.testing.assert_allclose(gradient, fd_grad(f, C), rtol=1e-7)


def test_square_root_under_vmap_and_jit():
    batch = jnp.stack([C, C * (0.5 - 0.2j), C.conj()])
    np.testing.assert_allclose(jax.jit(jax.vmap(_sqrt))(batch), jnp.sqrt(batch), rtol=1e-12)
    gradients = jax.jit(jax.vmap(jax.grad(lambda c: jnp.sum(jnp.abs(_sqrt(c)) ** 2))))(batch)
    np.testing.assert_allclose(gradients, np.conj(batch) / np.abs(batch), rtol=1e-10)


def test_mixed_params_complex_and_real():
    # x² = s·c with s real, c complex: Σ|x|² = s·Σ|c|.
    def loss(p):
        x = implicax.root_solve(
            lambda x, p: x * x - p["s"].astype(p["c"].dtype) * p["c"], 1 + C / 2, p
        )
        return jnp.sum(jnp.abs(x) ** 2)

    p = {"c": C, "s": jnp.asarray(1.3)}
    gradient = jax.grad(loss)(p)
    np.testing.assert_allclose(gradient["s"], np.sum(np.abs(C)), rtol=1e-10)
    np.testing.assert_allclose(gradient["c"], 1.3 * np.conj(C) / np.abs(C), rtol=1e-10)


# --- A·x = B·θ: a linear residual, every linear solver, second order ----------------------


def _system(hermitian, seed=0):
    rng = _rng(seed)
    n = 6
    m = _complex_normal(rng, n, n) / np.sqrt(n)
    a = m @ m.conj().T + np.eye(n) if hermitian else 2 * np.eye(n) + m
    return jnp.asarray(a), jnp.asarray(_complex_normal(rng, n, 3))


LINEAR = [
    pytest.param(implicax.BiCGStab(), False, id="BiCGStab"),
    pytest.param(implicax.GMRES(restart=3), False, id="GMRES"),
    pytest.param(implicax.Dense(), False, id="Dense"),
    pytest.param(implicax.CG(), True, id="CG-hermitian"),
]


@pytest.mark.parametrize("linear_solver, hermitian", LINEAR)
def test_linear_residual_derivatives_every_linear_solver(linear_solver, hermitian):
    a, b = _system(hermitian)
    newton = implicax.Newton(linear_solver=linear_solver)

    def solution(theta):  # real θ entering complexly
        fn = lambda x, t: a @ x - b @ t.astype(b.dtype)  # noqa: E731
        x0 = jnp.zeros(a.shape[0], a.dtype)
        return implicax.root_solve(fn, x0, theta, solver=newton, linear_solver=linear_solver)

    theta = jnp.asarray([0.5, -1.0, 2.0])
    jacobian = np.linalg.solve(a, b)  # dx/dθ
    np.testing.assert_allclose(solution(theta), jacobian @ np.asarray(theta), rtol=1e-9)
    np.testing.assert_allclose(jax.jacfwd(solution)(theta), jacobian, rtol=1e-9, atol=1e-12)
    # Reverse mode on the real and imaginary parts (jacrev wants real outputs).
    parts = lambda t: jnp.concatenate([jnp.real(solution(t)), jnp.imag(solution(t))])  # noqa: E731
    expected = np.concatenate([jacobian.real, jacobian.imag])
    np.testing.assert_allclose(jax.jacrev(parts)(theta), expected, rtol=1e-9, atol=1e-12)
    # Second order: L = Σ|x|² = θᵀ·Re(JᴴJ)·θ, so the Hessian is 2·Re(JᴴJ).
    loss = lambda t: jnp.sum(jnp.abs(solution(t)) ** 2)  # noqa: E731
    hessian = 2 * np.real(jacobian.conj().T @ jacobian)
    np.testing.assert_allclose(jax.hessian(loss)(theta), hessian, rtol=1e-8, atol=1e-10)


def test_linear_residual_complex_params_jacrev():
    a, b = _system(False)
    theta = jnp.asarray([0.5 + 1j, -1.0, 2.0 - 0.3j])

    def solution(t):
        x0 = jnp.zeros(a.shape[0], a.dtype)
        return implicax.root_solve(lambda x, t: a @ x - b @ t, x0, t)

    jacobian = np.linalg.solve(a, b)
    np.testing.assert_allclose(jax.jacrev(solution, holomorphic=True)(theta), jacobian, rtol=1e-9)
    loss = lambda t: jnp.sum(jnp.abs(solution(t)) ** 2)  # noqa: E731
    # dL = 2·Re(xᴴ·J·dθ), so ∂L/∂a − i·∂L/∂b = 2·conj(Jᴴx) = 2·Jᵀ·conj(x).
    closed = 2 * jacobian.T @ np.conj(jacobian @ theta)
    np.testing.assert_allclose(jax.grad(loss)(theta), closed, rtol=1e-9)
    np.testing.assert_allclose(jax.grad(loss)(theta), fd_grad(loss, theta), rtol=1e-7)


# --- x = 0.5·tanh(W·x) + θ: every forward solver, and Neumann -------------------------------

W = jnp.asarray(_complex_normal(_rng(1), 5, 5) * 0.15)
THETA = jnp.asarray(_complex_normal(_rng(2), 5) * 0.5)


def _contraction(x, theta):
    return 0.5 * jnp.tanh(W.astype(x.dtype) @ x) + theta


def _fixed_point(theta, solver, linear_solver=None):
    x0 = jnp.zeros_like(theta)
    return implicax.fixed_point_solve(
        _contraction, x0, theta, solver=solver, linear_solver=linear_solver
    )


def _check_fixed_point(solver, linear_solver):
    x = _fixed_point(THETA, solver, linear_solver)
    np.testing.assert_allclose(x, _contraction(x, THETA), rtol=1e-10)

    def loss(theta):  # a real loss of a complex solution: |x|² and a real part
        x = _fixed_point(theta, solver, linear_solver)
        return jnp.sum(jnp.abs(x) ** 2) + jnp.real(jnp.sum((1 + 2j) * x))

    np.testing.assert_allclose(jax.grad(loss)(THETA), fd_grad(loss, THETA), rtol=1e-7)
    tangent = jnp.asarray(_complex_normal(_rng(3), 5))
    f = lambda t: _fixed_point(t, solver, linear_solver)  # noqa: E731
    _, x_dot = jax.jvp(f, (THETA,), (tangent,))
    np.testing.assert_allclose(x_dot, fd_jvp(f, THETA, tangent), rtol=1e-7)


# Histories shorter than the iteration count, so that Anderson and Broyden wrap around.
FORWARD = [
    implicax.FixedPointIteration(**TIGHT),
    implicax.Anderson(history=2, **TIGHT),
    implicax.Broyden(history=2, **TIGHT),
    implicax.Newton(**TIGHT),
]


@pytest.mark.parametrize("solver", FORWARD, ids=lambda s: type(s).__name__)
def test_contraction_every_forward_solver(solver):
    _check_fixed_point(solver, None)


@pytest.mark.parametrize(
    "linear_solver",
    [implicax.Neumann(), implicax.GMRES(restart=2), implicax.Dense()],
    ids=lambda s: type(s).__name__,
)
def test_contraction_linear_solvers(linear_solver):
    _check_fixed_point(implicax.FixedPointIteration(**TIGHT), linear_solver)


def test_complex64_matches_complex128():
    theta64 = THETA.astype(jnp.complex64)
    solver = implicax.Anderson()
    x = _fixed_point(theta64, solver)
    assert x.dtype == jnp.complex64
    np.testing.assert_allclose(x, _fixed_point(THETA, solver), rtol=1e-4)

    def loss(theta):
        return jnp.sum(jnp.abs(_fixed_point(theta, solver)) ** 2)

    gradient = jax.grad(loss)(theta64)
    assert gradient.dtype == jnp.complex64
    np.testing.assert_allclose(gradient, fd_grad(loss, THETA), rtol=1e-4)


# --- a mixed x: a complex leaf and a real leaf ----------------------------------------------


@pytest.mark.parametrize(
    "linear_solver", [implicax.BiCGStab(), implicax.Dense()], ids=lambda s: type(s).__name__
)
def test_mixed_complex_and_real_x(linear_solver):
    # z-rows holomorphic in z; the real r-rows depend on r only (A real-valued function of z
    # cannot be holomorphic): A·z + B·r = θ·c, C·r = θ·1.
    rng = _rng(4)
    a = jnp.asarray(4 * np.eye(3) + _complex_normal(rng, 3, 3))
    b = jnp.asarray(_complex_normal(rng, 3, 2))
    c = jnp.asarray(3 * np.eye(2) + rng.standard_normal((2, 2)))
    c0 = jnp.asarray(_complex_normal(rng, 3))

    def fn(x, theta):
        z, r = x["z"], x["r"]
        return {"z": a @ z + b @ r.astype(z.dtype) - theta * c0, "r": c @ r - theta}

    def solution(theta):
        x0 = {"z": jnp.zeros(3, jnp.complex128), "r": jnp.zeros(2)}
        return implicax.root_solve(fn, x0, theta, linear_solver=linear_solver)

    r_dot = np.linalg.solve(c, np.ones(2))  # x is linear in θ: x = θ·(z_dot, r_dot)
    z_dot = np.linalg.solve(a, c0 - b @ r_dot.astype(b.dtype))
    x = solution(0.7)
    assert x["r"].dtype == jnp.float64
    np.testing.assert_allclose(x["z"], 0.7 * z_dot, rtol=1e-9)
    jacobian = jax.jacfwd(solution)(0.7)
    np.testing.assert_allclose(jacobian["z"], z_dot, rtol=1e-9)
    np.testing.assert_allclose(jacobian["r"], r_dot, rtol=1e-9)

    def loss(theta):
        x = solution(theta)
        return jnp.sum(jnp.abs(x["z"]) ** 2) + jnp.sum(x["r"])

    closed = 2 * 0.7 * np.sum(np.abs(z_dot) ** 2) + np.sum(r_dot)
    np.testing.assert_allclose(jax.grad(loss)(0.7), closed, rtol=1e-9)


# --- the linear solvers alone, on complex matrices ------------------------------------------


def _solve(solver, a, b):
    x, stats = solver.solve(lambda v: a @ v, b)
    assert stats.residual_norm.dtype == jnp.float64
    assert bool(stats.converged)
    return x


@pytest.mark.parametrize(
    "solver",
    [implicax.BiCGStab(), implicax.GMRES(restart=5), implicax.Dense()],
    ids=lambda s: type(s).__name__,
)
def test_linear_solvers_complex_nonsymmetric(solver):
    rng = _rng(5)
    n = 24  # past GMRES's restart length
    a = jnp.asarray(2 * np.eye(n) + _complex_normal(rng, n, n) / np.sqrt(2 * n))
    b = jnp.asarray(_complex_normal(rng, n))
    np.testing.assert_allclose(_solve(solver, a, b), np.linalg.solve(a, b), rtol=1e-8)


def test_cg_hermitian_positive_definite_and_neumann_contraction():
    rng = _rng(6)
    n = 24
    m = _complex_normal(rng, n, n) / np.sqrt(2 * n)
    b = jnp.asarray(_complex_normal(rng, n))
    hermitian = jnp.asarray(m @ m.conj().T + 0.5 * np.eye(n))
    x = _solve(implicax.CG(), hermitian, b)
    np.testing.assert_allclose(x, np.linalg.solve(hermitian, b), rtol=1e-8)
    contraction = jnp.asarray(np.eye(n) - 0.4 * m / np.linalg.norm(m, 2))
    x = _solve(implicax.Neumann(), contraction, b)
    np.testing.assert_allclose(x, np.linalg.solve(contraction, b), rtol=1e-8)


def test_bicgstab_restarts_on_a_complex_permutation():
    # ⟨r, A·r⟩ = 0 for a cyclic shift: BiCGStab breaks down at once and must restart with a
    # fresh shadow whose ρ keeps its imaginary part.
    n = 8
    a = jnp.asarray((0.6 + 0.8j) * np.roll(np.eye(n), 1, axis=0))
    b = jnp.asarray(_complex_normal(_rng(7), n))
    np.testing.assert_allclose(_solve(implicax.BiCGStab(), a, b), np.linalg.solve(a, b), rtol=1e-8)


# --- fn not holomorphic in x ----------------------------------------------------------------


def test_non_holomorphic_fn_fails_loudly():
    # z = 0.3·conj(z) + θ is not complex-differentiable in z: its tangent system is only
    # real-linear, which Dense cannot solve as a complex matrix; the failure is reported.
    def solution(theta):
        fn = lambda z, t: 0.3 * jnp.conj(z) + t  # noqa: E731
        z0 = jnp.zeros(2, jnp.complex128)
        return implicax.fixed_point_solve(
            fn, z0, theta, linear_solver=implicax.Dense(), on_failure="raise"
        )

    theta = jnp.asarray([1.0 + 2.0j, -0.5 + 0.1j])
    with pytest.raises(Exception, match="holomorphic"):
        jax.block_until_ready(jax.jvp(solution, (theta,), (theta,)))


def test_non_holomorphic_fn_as_real_pair():
    # The documented workaround: x as (real, imaginary) parts. Exact solution:
    # Re z = Re θ / 0.7, Im z = Im θ / 1.3. θ may enter non-holomorphically.
    def fn(x, theta):
        re, im = x
        return 0.3 * re + jnp.real(theta), -0.3 * im + jnp.imag(theta)

    def solution(theta):
        zeros = jnp.zeros(2)
        re, im = implicax.fixed_point_solve(fn, (zeros, zeros), theta)
        return jax.lax.complex(re, im)

    theta = jnp.asarray([1.0 + 2.0j, -0.5 + 0.1j])
    t = np.asarray(theta)
    np.testing.assert_allclose(solution(theta), t.real / 0.7 + 1j * t.imag / 1.3)

    def loss(theta):
        return jnp.sum(jnp.abs(solution(theta)) ** 2)

    closed = 2 * t.real / 0.7**2 - 1j * 2 * t.imag / 1.3**2
    np.testing.assert_allclose(jax.grad(loss)(theta), closed, rtol=1e-9)
    np.testing.assert_allclose(jax.grad(loss)(theta), fd_grad(loss, theta), rtol=1e-7)
