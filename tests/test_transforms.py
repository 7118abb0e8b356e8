"""The public entry points under jit, vmap (nested, over params and/or x0), device placement and
pmap (chex variants), with dtypes float32, float64 and bfloat16."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from problems import B, N, W, spd_residual, tanh_map, unrolled_tanh

import implicax


def fixed_point_sum(b):
    return jnp.sum(implicax.fixed_point_solve(tanh_map, jnp.zeros(N), (W, b)))


def root_sum(a):
    return jnp.sum(implicax.root_solve(spd_residual, jnp.zeros(N), a))


class VariantsTest(chex.TestCase):
    @chex.variants(
        with_jit=True, without_jit=True, with_device=True, without_device=True, with_pmap=True
    )
    @parameterized.named_parameters(("fixed_point", fixed_point_sum), ("root", root_sum))
    def test_value_and_grad_match_unpressed_reference(self, function):
        reference_value, reference_grad = jax.value_and_grad(function)(B)
        # with_pmap broadcasts B to every device and returns the first device's output.
        value, grad = self.variant(jax.value_and_grad(function))(B)
        np.testing.assert_allclose(value, reference_value, rtol=1e-12)
        np.testing.assert_allclose(grad, reference_grad, rtol=1e-10)

    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_mode_matches_unrolled(self):
        jac = self.variant(
            jax.jacfwd(lambda b: implicax.fixed_point_solve(tanh_map, jnp.zeros(N), (W, b)))
        )(B)
        np.testing.assert_allclose(jac, jax.jacfwd(lambda b: unrolled_tanh((W, b)))(B), rtol=1e-9)


def test_vmap_over_params_x0_and_both_nested():
    bs = B + jnp.linspace(-1, 1, 4)[:, None]
    x0s = jnp.linspace(-0.5, 0.5, 4)[:, None] * jnp.ones(N)
    expected = jax.vmap(lambda b: unrolled_tanh((W, b)))(bs)

    def solve(b, x0):
        return implicax.fixed_point_solve(tanh_map, x0, (W, b))

    np.testing.assert_allclose(jax.vmap(solve, (0, None))(bs, jnp.zeros(N)), expected, rtol=1e-9)
    np.testing.assert_allclose(
        jax.vmap(solve, (None, 0))(B, x0s),
        jnp.broadcast_to(expected[0] * 0 + unrolled_tanh((W, B)), (4, N)),
        rtol=1e-9,
    )
    np.testing.assert_allclose(jax.vmap(solve)(bs, x0s), expected, rtol=1e-9)
    nested = jax.jit(jax.vmap(jax.vmap(solve)))(bs.reshape(2, 2, N), x0s.reshape(2, 2, N))
    np.testing.assert_allclose(nested.reshape(4, N), expected, rtol=1e-9)
    grads = jax.vmap(jax.grad(lambda b: jnp.sum(solve(b, jnp.zeros(N)))))(bs)
    expected_grads = jax.vmap(jax.grad(lambda b: jnp.sum(unrolled_tanh((W, b)))))(bs)
    np.testing.assert_allclose(grads, expected_grads, rtol=1e-8)


@pytest.mark.parametrize(
    "dtype, rtol", [(jnp.float64, 1e-9), (jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)]
)
@pytest.mark.parametrize(
    "solver",
    [implicax.FixedPointIteration(), implicax.Anderson(), implicax.Broyden(), implicax.Newton()],
    ids=lambda s: type(s).__name__,
)
def test_dtypes_are_kept_and_accurate(dtype, rtol, solver):
    w, b = W.astype(dtype), B.astype(dtype)

    def solve(b):
        return implicax.fixed_point_solve(tanh_map, jnp.zeros(N, dtype), (w, b), solver=solver)

    x = jax.jit(solve)(b)
    grad = jax.jit(jax.grad(lambda b: jnp.sum(solve(b))))(b)
    assert x.dtype == dtype and grad.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(x, np.float64), unrolled_tanh((W, B)), rtol=rtol, atol=rtol
    )
    expected = jax.grad(lambda b: jnp.sum(unrolled_tanh((W, b))))(B)
    np.testing.assert_allclose(np.asarray(grad, np.float64), expected, rtol=4 * rtol, atol=4 * rtol)


def test_stats_are_returned_and_solution_stays_differentiable():
    def solve(b):
        return implicax.fixed_point_solve(tanh_map, jnp.zeros(N), (W, b), return_stats=True)

    x, stats = jax.jit(solve)(B)
    assert stats.steps.dtype == jnp.int32 and stats.converged.dtype == jnp.bool_
    assert bool(stats.converged) and 0 < int(stats.steps) < 100
    assert float(stats.residual_norm) < 1e-9
    grad = jax.grad(lambda b: jnp.sum(solve(b)[0]))(B)
    np.testing.assert_allclose(
        grad, jax.grad(lambda b: jnp.sum(unrolled_tanh((W, b))))(B), rtol=1e-8
    )
    batched = jax.vmap(solve)(jnp.stack([B, B + 1]))[1]
    assert batched.steps.shape == (2,) and bool(jnp.all(batched.converged))


def test_deterministic_across_runs():
    f = jax.jit(jax.grad(fixed_point_sum))
    first = np.asarray(f(B))
    jax.clear_caches()
    second = np.asarray(jax.jit(jax.grad(fixed_point_sum))(B))
    np.testing.assert_array_equal(first, second)


_DETERMINISM_SCRIPT = """
import hashlib
import jax, jax.numpy as jnp, numpy as np
import implicax

key_w, key_x = jax.random.split(jax.random.key(0))
w = 0.9 * jax.random.orthogonal(key_w, 512)
x = jax.random.normal(key_x, (256, 512))
fn = lambda z, p: jnp.tanh(z @ p[0] + p[1])
for solver in (implicax.FixedPointIteration(), implicax.Anderson(), implicax.Broyden()):
    loss = lambda p: jnp.sum(implicax.fixed_point_solve(fn, jnp.zeros_like(x), p, solver=solver) ** 2)
    value, grads = jax.jit(jax.value_and_grad(loss))((w, x))
    for a in (value, *grads):
        print(hashlib.sha256(np.asarray(a).tobytes()).hexdigest())
"""


def test_bitwise_identical_across_processes():
    # Separate processes: fresh compilation, thread pools and allocations each time
    # (float32 matrix products large enough to be split across threads).
    def run():
        return subprocess.run(
            [sys.executable, "-c", _DETERMINISM_SCRIPT],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        ).stdout.split()

    first, second = run(), run()
    assert len(first) == 9 and first == second
