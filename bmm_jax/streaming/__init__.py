"""Streaming merges of checkpoints larger than memory: safetensors in, safetensors (or orbax) out.

* :func:`merge_checkpoints` -- merge HF safetensors checkpoints file to file, tensor by tensor
  (anchors, or BMM with data-free Grams or Grams from files), atomically, optionally across
  processes with ``jax.distributed``;
* :class:`Checkpoint` -- memory-mapped, per-tensor reads of a safetensors folder;
* :class:`ShardWriter`, :class:`OutputFolder` -- sharded safetensors output written as produced,
  into a folder that appears atomically;
* :func:`tensor_labels` -- the label of every tensor of a flat (HF-named) checkpoint.
"""
from bmm_jax.streaming.labels import VOCAB_PATTERNS, detect_naming, is_vocab_tensor, tensor_labels
from bmm_jax.streaming.merge import merge_checkpoints, working_set_bytes
from bmm_jax.streaming.reader import Checkpoint, is_safetensors_checkpoint, read_header
from bmm_jax.streaming.writer import (OutputFolder, ShardWriter, check_output_path, is_bmm_output, plan_shards,
                                      shard_names)

__all__ = ["merge_checkpoints", "working_set_bytes", "Checkpoint", "read_header", "is_safetensors_checkpoint",
           "ShardWriter", "OutputFolder", "plan_shards", "shard_names", "check_output_path", "is_bmm_output",
           "tensor_labels", "detect_naming", "is_vocab_tensor", "VOCAB_PATTERNS"]
