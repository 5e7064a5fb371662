"""Test set-up: CPU backend with 8 fake devices (set before jax is imported), float32 matmuls, jaxtyping checks, and
the ``dev_package`` fixture for optional test-only imports."""

import atexit
import importlib
import os
import shutil
import tempfile

# Cheaper LLVM passes: the suite is dominated by CPU compilation of small programs, and these flags halve it
# without changing any arithmetic.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=1").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The command-line tools' persistent compilation cache (on by default): a folder of this session, not the user's.
if "SAMMED3D_JAX_CACHE" not in os.environ:
    os.environ["SAMMED3D_JAX_CACHE"] = tempfile.mkdtemp(prefix="sammed3d_jax_test_cache_")
    atexit.register(shutil.rmtree, os.environ["SAMMED3D_JAX_CACHE"], ignore_errors=True)

import pathlib  # noqa: E402

from jaxtyping import install_import_hook  # noqa: E402

# Shape/dtype annotations of the package are checked at call (and trace) time during the tests only.
install_import_hook(["sammed3d_jax"], "beartype.beartype")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_fixture_dir() -> pathlib.Path:
    return FIXTURES / "upstream_tiny"


def import_dev_package(name: str):
    """Imports a ``[dev]`` package (a test-only oracle); without it the test is skipped, except when ``CI=true``:
    then the import error fails the test, so the suite cannot pass in CI by skipping what it was meant to check."""
    if os.environ.get("CI", "").strip().lower() == "true":
        return importlib.import_module(name)
    return pytest.importorskip(name)


@pytest.fixture(scope="session")
def dev_package():
    """``dev_package("surface_distance")``: see :func:`import_dev_package`."""
    return import_dev_package
