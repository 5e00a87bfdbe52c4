"""Strict test environment (equinox style): every test runs with strict dtype promotion, so an
implicit float32 <-> float64 or int <-> float mix in library code fails loudly. Third-party model
code (HF Flax) is wrapped by the library in ``jax.numpy_dtype_promotion("standard")`` where needed."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(autouse=True)
def _strict_dtype_promotion():
    with jax.numpy_dtype_promotion("strict"):
        yield
