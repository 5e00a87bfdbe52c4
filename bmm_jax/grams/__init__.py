"""Gram estimators (method.md §3): ``data_free`` (from task vectors), ``activations`` (streaming,
from captured module inputs), ``hybrid`` (few-shot mix of both). Each returns a :class:`Grams`."""
from bmm_jax.grams._base import Grams
from bmm_jax.grams.activations import (GramState, capture, capture_inputs, finalize, from_states,
                                       gram_from_activations, init, update)
from bmm_jax.grams.activations import activations
from bmm_jax.grams.data_free import data_free, normalized_factors
from bmm_jax.grams.hybrid import hybrid, mix

__all__ = ["Grams", "data_free", "activations", "hybrid", "GramState", "init", "update", "finalize",
           "gram_from_activations", "capture_inputs", "capture", "from_states", "normalized_factors", "mix"]
