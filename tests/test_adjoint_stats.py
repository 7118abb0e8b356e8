"""The adjoint solve's statistics through a probe (`stats_probe` / `read_probe`): the record
equals the statistics of the same adjoint system solved on its own, per call, under jit, vmap
and pmap, and an unused probe changes nothing in the compiled program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import implicax

N = 6
_KEYS = jax.random.split(jax.random.key(3), 2)
W = jax.random.normal(_KEYS[0], (N, N)) * 0.3 / N**0.5
X_IN = jax.random.normal(_KEYS[1], (N,))


def f(z, w):
    return jnp.tanh(w @ z + X_IN)


def loss(w, probe, linear_solver=None, on_failure="warn"):
    z = implicax.fixed_point_solve(
        f,
        jnp.zeros(N),
        w,
        adjoint_stats=probe,
        linear_solver=linear_solver,
        on_failure=on_failure,
    )
    return jnp.sum(jnp.sin(z))


def direct_adjoint_stats(w, linear_solver):
    """The adjoint system λ(I − ∂f/∂z) = z̄ solved on its own, from the same solution."""
    z = implicax.fixed_point_solve(f, jnp.zeros(N), w)
    _, vjp = jax.vjp(lambda v: f(v, w), z)
    return linear_solver.solve(lambda v: v - vjp(v)[0], jnp.cos(z))[1]


SOLVERS = [implicax.BiCGStab(), implicax.GMRES(), implicax.Neumann(), implicax.Dense()]


@pytest.mark.parametrize("linear_solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_probe_records_the_adjoint_solve(linear_solver):
    grad, probe_bar = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(
        W, implicax.stats_probe(), linear_solver
    )
    recorded = implicax.read_probe(probe_bar)
    expected = direct_adjoint_stats(W, linear_solver)
    assert int(recorded.steps) == int(expected.steps) > 1
    # (equal up to rounding: a residual of 1e-16 is rounding itself)
    np.testing.assert_allclose(recorded.residual_norm, expected.residual_norm, atol=1e-14)
    assert bool(recorded.converged) is bool(expected.converged) is True
    assert not bool(recorded.diverged)
    # The probe changes nothing else: the gradient is the one without it.
    np.testing.assert_array_equal(grad, jax.grad(loss)(W, None, linear_solver))


def test_probe_reports_a_failed_adjoint_solve():
    solver = implicax.BiCGStab(max_steps=5)
    _, probe_bar = jax.grad(loss, argnums=(0, 1))(W, implicax.stats_probe(), solver, "ignore")
    recorded = implicax.read_probe(probe_bar)
    assert not bool(recorded.converged)
    expected = direct_adjoint_stats(W, solver)
    assert int(recorded.steps) == int(expected.steps) == 5
    np.testing.assert_allclose(recorded.residual_norm, expected.residual_norm, rtol=1e-5)
    assert float(recorded.residual_norm) > 1e-5


def test_probe_per_batch_element_or_summed_over_the_batch():
    ws = jnp.stack([W, 2 * W, 3 * W])
    per_sample = jax.vmap(jax.grad(loss, argnums=(0, 1)))(ws, jnp.zeros((3, 5)))[1]
    recorded = implicax.read_probe(per_sample)
    expected = [direct_adjoint_stats(w, implicax.BiCGStab()) for w in ws]
    np.testing.assert_array_equal(recorded.steps, [int(e.steps) for e in expected])
    assert recorded.converged.shape == (3,) and bool(recorded.converged.all())

    def batch_loss(ws, probe):  # one probe shared by the batch: the records add up
        return jax.vmap(loss, in_axes=(0, None))(ws, probe).sum()

    shared = implicax.read_probe(jax.grad(batch_loss, argnums=1)(ws, implicax.stats_probe()))
    assert int(shared.steps) == sum(int(e.steps) for e in expected)
    assert bool(shared.converged)


def test_probe_under_pmap():
    devices = jax.local_device_count()
    ws = jnp.stack([W * (1 + 0.5 * i) for i in range(devices)])
    probes = jnp.zeros((devices, 5))
    _, probe_bar = jax.pmap(jax.grad(loss, argnums=(0, 1)))(ws, probes)
    recorded = implicax.read_probe(probe_bar)
    expected = [int(direct_adjoint_stats(w, implicax.BiCGStab()).steps) for w in ws]
    np.testing.assert_array_equal(recorded.steps, expected)
    assert bool(recorded.converged.all())


def test_probe_under_shard_map():
    devices = jax.local_device_count()
    mesh = jax.make_mesh((devices,), ("i",), axis_types=(jax.sharding.AxisType.Auto,))
    ws = jnp.concatenate([W * (1 + 0.5 * i) for i in range(devices)])  # one block per device
    expected = [
        int(direct_adjoint_stats(w, implicax.BiCGStab()).steps) for w in ws.reshape(devices, N, N)
    ]

    def per_device(probe_spec):
        def grad(w, probe):
            return jax.grad(loss, argnums=(0, 1))(w, probe.reshape(5))[1].reshape(probe.shape)

        return jax.jit(
            jax.shard_map(grad, mesh=mesh, in_specs=(P("i"), probe_spec), out_specs=probe_spec)
        )

    sharded = per_device(P("i"))(ws, jnp.zeros((devices, 5)))  # one probe per device
    np.testing.assert_array_equal(implicax.read_probe(sharded).steps, expected)
    shared = per_device(P())(ws, implicax.stats_probe())  # replicated: the devices' sum
    assert int(implicax.read_probe(shared).steps) == sum(expected)


def test_probe_on_a_pytree_root_solve_and_in_forward_mode():
    def residual(x, theta):  # two leaves, one of them independent of theta
        return {"a": x["a"] ** 3 + x["a"] - theta, "b": 2.0 * x["b"] - 1.0}

    def solution_loss(theta, probe):
        x = implicax.root_solve(residual, {"a": 0.5, "b": 0.0}, theta, adjoint_stats=probe)
        return x["a"] + x["b"]

    theta = jnp.asarray(2.0)  # a = 1, da/dθ = 1 / (3a² + 1)
    grad, probe_bar = jax.grad(solution_loss, argnums=(0, 1))(theta, implicax.stats_probe())
    np.testing.assert_allclose(grad, 0.25, rtol=1e-10)
    recorded = implicax.read_probe(probe_bar)
    assert bool(recorded.converged) and int(recorded.steps) >= 2
    # Forward mode has no adjoint solve: the probe is inert there.
    np.testing.assert_allclose(
        jax.jacfwd(solution_loss)(theta, implicax.stats_probe()), 0.25, rtol=1e-10
    )


def test_an_undifferentiated_probe_costs_nothing():
    def census(fn, *args):
        text = jax.jit(fn).lower(*args).compile().as_text()
        return [text.count(op) for op in ("fusion(", " while(", " dot(", "custom-call(")]

    without = census(jax.grad(lambda w: loss(w, None)), W)
    assert census(jax.grad(loss), W, implicax.stats_probe()) == without
    # (Asked for, the record costs a few concatenations, not another solve.)
    asked = census(jax.grad(loss, argnums=(0, 1)), W, implicax.stats_probe())
    assert asked[1:3] == without[1:3]


def test_bad_probes_are_named():
    with pytest.raises(TypeError, match="adjoint_stats must be a probe made by"):
        loss(W, jnp.zeros(3))
    with pytest.raises(TypeError, match="adjoint_stats must be a probe made by"):
        loss(W, jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="last axis of size 5"):
        implicax.read_probe(jnp.zeros(4))


def test_probe_reports_a_nan_in_a_cotangent_of_5000_elements():
    # (XLA:CPU's max drops NaNs from 4096 elements; the record must not.)
    n = 5000

    def big_loss(p, probe):
        z = implicax.fixed_point_solve(
            lambda z, p: 0.5 * jnp.tanh(z) + p,
            jnp.zeros(n),
            p,
            adjoint_stats=probe,
            on_failure="ignore",
        )
        return jnp.sum(z * jnp.ones(n).at[4321].set(jnp.nan))

    _, record = jax.jit(jax.grad(big_loss, argnums=(0, 1)))(
        jnp.full(n, 0.1), implicax.stats_probe()
    )
    stats = implicax.read_probe(record)
    assert bool(stats.diverged) and not bool(stats.converged)
