"""Command-line entry points: ``bmm-merge`` (:mod:`bmm_jax.cli.merge`) and ``bmm-experiment``
(:mod:`bmm_jax.cli.experiment`). Both are also runnable as ``python -m bmm_jax.cli.<name>``."""
