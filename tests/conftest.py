"""Test configuration: 4 CPU devices (so pmap and shard_map tests run), float64 available."""

import os

# Must be set before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
# `make test-strict` (in CI) runs the derivative tests as optimistix's and equinox's suites do.
if os.environ.get("IMPLICAX_DTYPE_PROMOTION"):
    jax.config.update("jax_numpy_dtype_promotion", os.environ["IMPLICAX_DTYPE_PROMOTION"])


@pytest.fixture(autouse=True, scope="module")
def _clear_jax_caches():
    # Each compiled executable holds memory maps; thousands of small ones (third-order
    # derivative checks) exhaust the kernel's map limit (vm.max_map_count) in one process.
    yield
    jax.clear_caches()
