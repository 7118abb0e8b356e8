"""on_failure="raise" on several devices: a failure on one device raises a Python exception on
the caller (no device is left waiting in a later collective, which XLA would end by aborting
the process), and the process stays usable: later solves and `jax.effects_barrier` work.

A regression could hang or abort, so the scenarios run in a child process with a timeout,
with as many devices as this process has (one device: the same scenarios on one).
"""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

SCENARIOS = (
    "pmap_pmean",
    "shard_map_psum",
    "pmap_grad",
    "pmap_vmap",
    "pmap_nested",
    "pmap_no_collective",
)

CHILD = textwrap.dedent(
    """
    import time
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.sharding import PartitionSpec as P

    import implicax

    jax.config.update("jax_enable_x64", True)
    n = jax.device_count()
    bad = n // 2  # the device whose problem fails (device 0 when there is one)
    good = jnp.full((n, 2), 0.5)
    failing = good.at[bad].set(2.0)  # x -> 2x + 1 diverges; x -> x/2 + 1 has the fixed point 2


    def affine(x, slope):
        return slope * x + 1.0


    def solve(slope):
        return implicax.fixed_point_solve(affine, jnp.zeros(2), slope, on_failure="raise")


    def adjoint_fails(slope):
        # Newton solves the forward problem on every device; the Neumann series of the
        # adjoint system diverges where the slope is 2.
        return jnp.sum(
            implicax.fixed_point_solve(
                affine,
                jnp.zeros(2),
                slope,
                solver=implicax.Newton(),
                linear_solver=implicax.Neumann(),
                on_failure="raise",
            )
        )


    def nested(slope):
        # A solve in fn runs in the outer solve's loop, which stops after a different number
        # of steps on each device: it checks for its device alone. Here it converges
        # everywhere, and the outer solve is the one that fails on one device.
        def inner(y):
            y = jnp.where(jnp.isfinite(y), y, 0.0)
            return solve(0.25 + 0.1 * jnp.tanh(y) ** 2)

        return implicax.fixed_point_solve(
            lambda y, s: s * y + 1.0 + 0.0 * inner(y), jnp.zeros(2), slope, on_failure="raise"
        )


    mesh = jax.make_mesh((n,), ("i",), axis_types=(jax.sharding.AxisType.Auto,))
    run = {
        "pmap_pmean": jax.pmap(lambda s: lax.pmean(solve(s), "d"), axis_name="d"),
        "shard_map_psum": jax.jit(
            jax.shard_map(
                lambda s: lax.psum(solve(s[0]), "i"), mesh=mesh, in_specs=P("i"), out_specs=P()
            )
        ),
        "pmap_grad": jax.pmap(lambda s: lax.pmean(jax.grad(adjoint_fails)(s), "d"), "d"),
        "pmap_vmap": jax.pmap(
            lambda s: lax.pmean(jax.vmap(solve)(jnp.stack([s, jnp.full(2, 0.5)])), "d"), "d"
        ),
        "pmap_nested": jax.pmap(lambda s: lax.pmean(nested(s), "d"), axis_name="d"),
        "pmap_no_collective": jax.pmap(solve),
    }
    expected = {  # the healthy results
        "pmap_pmean": np.full((n, 2), 2.0),
        "shard_map_psum": np.full(2, 2.0 * n),
        "pmap_grad": np.full((n, 2), 4.0),  # d/ds of 1/(1 - s) at s = 1/2
        "pmap_vmap": np.full((n, 2, 2), 2.0),
        # different slopes: each device's loop (with the inner solve) takes its own steps
        "pmap_nested": np.full((n, 2), np.mean(1 / (1 - np.linspace(0.2, 0.6, n)))),
        "pmap_no_collective": np.full((n, 2), 2.0),
    }
    what = {"pmap_grad": "adjoint linear solve"}
    healthy = {"pmap_nested": jnp.linspace(0.2, 0.6, n)[:, None].repeat(2, 1)}

    for name in SCENARIOS:
        problems = []
        start = time.monotonic()
        try:
            jax.block_until_ready(run[name](failing))
            problems.append("the failed solve returned normally")
        except Exception as error:  # JaxRuntimeError (ValueError when raised at dispatch)
            message = str(error)
            solve_what = what.get(name, "forward solve")
            if f"implicax: the {solve_what} did not converge" not in message:
                problems.append(f"not implicax's error: {message[-300:]!r}")
            elif f"of {n} devices" not in message:
                problems.append(f"the devices are not counted: {message[-300:]!r}")
        seconds = time.monotonic() - start
        for step in ("a barrier", "a second barrier", "the healthy step", "a last barrier"):
            try:
                if step == "the healthy step":  # the same compiled step, now healthy
                    again = jax.block_until_ready(run[name](healthy.get(name, good)))
                    np.testing.assert_allclose(np.asarray(again), expected[name], rtol=1e-8)
                else:  # must not raise the old error again
                    jax.effects_barrier()
            except Exception as error:
                problems.append(f"{step} raised {str(error)[-200:]!r}")
        verdict = "; ".join(problems) if problems else f"ok in {seconds:.1f} s"
        print(f"RESULT {name} {verdict}", flush=True)
    """
)


@pytest.fixture(scope="module")
def outcome():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={jax.device_count()}"
    )
    script = f"SCENARIOS = {SCENARIOS!r}\n{CHILD}"
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900
        )
        out, err, code = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        out, err, code = expired.stdout or "", expired.stderr or "", "timeout"
        out, err = [s.decode() if isinstance(s, bytes) else s for s in (out, err)]
    results = dict(
        line.removeprefix("RESULT ").split(" ", 1)
        for line in out.splitlines()
        if line.startswith("RESULT ")
    )
    return results, f"exit {code}; stdout:\n{out[-2000:]}\nstderr:\n{err[-4000:]}"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_raise_on_one_device_reaches_python_and_leaves_the_process_usable(outcome, scenario):
    results, log = outcome
    assert scenario in results, f"the scenario did not finish (hang or abort?): {log}"
    assert results[scenario].startswith("ok"), f"{results[scenario]}\n{log}"
