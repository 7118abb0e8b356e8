"""Shared by the adapter tests (test_flax_linen.py, test_flax_nnx.py, test_haiku.py): settings,
data, comparisons, and the data-parallel training checks for a functional ``apply(params, x)``.

float64 is enabled for the whole session by conftest.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import implicax

F64 = jnp.float64
UNROLL = 80  # plain iterations for the reference; the test cells contract by about 0.5
# The adapters do not depend on the solvers. These compile several times faster than the
# defaults, which the statistics tests and the examples exercise.
FAST = {
    "solver": implicax.FixedPointIteration(max_steps=300),
    "linear_solver": implicax.Neumann(max_steps=300),
}
OPTIMIZER = optax.adam(1e-2)


def random_data(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), F64)


def assert_tree_allclose(actual, expected, rtol=1e-7, atol=1e-9):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol),
        actual,
        expected,
    )


def data_mesh():
    """The 4 CPU devices (conftest.py) along one "data" axis."""
    return jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _one_slice_per_device(tree):
    return jax.device_put(tree, NamedSharding(data_mesh(), P("data")))


def replicated_per_device(tree):
    """For pmap: 4 copies of every leaf along a new leading axis, one on each device."""
    return _one_slice_per_device(jax.tree.map(lambda a: np.stack([a] * 4), tree))


def split_per_device(batch):
    """For pmap: the batch split into 4 slices along a new leading axis, one on each device."""
    return _one_slice_per_device(np.reshape(batch, (4, -1, *np.shape(batch)[1:])))


def train_step(apply, params, opt_state, x, y, axis_name=None):
    """One Adam step on the mean squared error of ``apply(params, x)``; gradients averaged over
    `axis_name` when given (pmap)."""
    value, grads = jax.value_and_grad(lambda p: jnp.mean((apply(p, x) - y) ** 2))(params)
    if axis_name is not None:
        grads = lax.pmean(grads, axis_name)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value


def reference_training(apply, params, x, y):
    """``(params, x, y, (new_params, loss))``: one training step on one device."""
    new_params, _, value = jax.jit(functools.partial(train_step, apply))(
        params, OPTIMIZER.init(params), x, y
    )
    return params, x, y, (new_params, value)


def check_sharded_jit_step(apply, training):
    """jit with the batch sharded over 4 devices and the parameters replicated."""
    params, x, y, expected = training
    mesh = data_mesh()
    sharded, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(OPTIMIZER.init(params), replicated)
    step = jax.jit(functools.partial(train_step, apply))
    new_params, _, value = step(
        params, opt_state, jax.device_put(x, sharded), jax.device_put(y, sharded)
    )
    assert_tree_allclose((new_params, value), expected, rtol=1e-8)


def check_pmap_step(apply, training):
    """pmap over 4 devices, 2 examples each, gradients averaged with pmean."""
    params, x, y, expected = training
    step = jax.pmap(functools.partial(train_step, apply, axis_name="data"), axis_name="data")
    new_params, _, _ = step(
        replicated_per_device(params),
        replicated_per_device(OPTIMIZER.init(params)),
        split_per_device(x),
        split_per_device(y),
    )
    new_params = jax.tree.map(lambda a: np.asarray(a)[0], new_params)
    assert_tree_allclose(new_params, expected[0], rtol=1e-8)


def check_shard_map_step(apply, training):
    """The model applied under shard_map (batch split over 4 devices) inside a jitted step."""
    params, x, y, expected = training
    sharded = jax.shard_map(apply, mesh=data_mesh(), in_specs=(P(), P("data")), out_specs=P("data"))
    new_params, _, value = jax.jit(functools.partial(train_step, sharded))(
        params, OPTIMIZER.init(params), x, y
    )
    assert_tree_allclose((new_params, value), expected, rtol=1e-8)


# Diagnostics (penalty_samples, radius_steps) and the adjoint-stats probe of the three layers.
PENALTY_SAMPLES = 4000  # Hutchinson sampling error about √(2/4000) ≈ 2%, checked within 10%
RADIUS_STEPS = 300


def symmetric_kernel(variables):
    """The variables with every square matrix (the kernels) made symmetric: a tanh cell's
    Jacobian D·K is then similar to D^½·K·D^½, so its eigenvalues are real and power
    iteration converges."""

    def fix(leaf):
        return (leaf + leaf.T) / 2 if leaf.ndim == 2 and leaf.shape[0] == leaf.shape[1] else leaf

    return jax.tree.map(fix, variables)


def check_diagnostics(z_star, cell_map, penalty, radius):
    """penalty ≈ ‖J‖_F²/n and radius ≈ max|eig J| for J = ∂cell_map/∂z at z*, from jacfwd."""
    n = z_star.size
    jacobian = np.asarray(jax.jacfwd(cell_map)(z_star)).reshape(n, n)
    np.testing.assert_allclose(penalty, np.sum(jacobian**2) / n, rtol=0.1)
    eigenvalues = np.linalg.eigvals(jacobian)
    assert np.max(np.abs(eigenvalues.imag)) < 1e-12  # the premise: a real spectrum
    np.testing.assert_allclose(radius, np.max(np.abs(eigenvalues)), rtol=1e-3)
    assert 0.05 < radius < 1  # a nontrivial contraction


def check_probe(record, steps=None):
    """The adjoint solve's record read from a probe's cotangent: converged, and after
    exactly `steps` products when given (PhantomGradient(k) uses k − 1)."""
    stats = implicax.read_probe(record)
    assert bool(stats.converged) and not bool(stats.diverged)
    if steps is None:
        assert int(stats.steps) > 1
    else:
        assert int(stats.steps) == steps


# linear_solver=, and its definition: that many damped cell steps from z* held constant.
INEXACT_GRADIENTS = {
    "argnames": "solver, steps, damping",
    "argvalues": [(implicax.PhantomGradient(3, 0.6), 3, 0.6), (implicax.JacobianFree(), 1, 1.0)],
    "ids": ["PhantomGradient", "JacobianFree"],
}
# linear_solver=, and the adjoint products its probe must record (None: some, unchecked).
PROBE_CASES = {
    "argnames": "linear_solver, steps",
    "argvalues": [(FAST["linear_solver"], None), (implicax.PhantomGradient(4), 3)],
}
