"""Checkpoints in and out: lazy reader, atomic sharded writer, provenance."""
from .dtypes import dtype_name, parse_dtype
from .provenance import Provenance
from .reader import Checkpoint, TensorInfo, open_checkpoint
from .atomic import AtomicFolder, check_not_input
from .writer import CheckpointWriter, parse_size, save_state_dict

__all__ = ["AtomicFolder", "Checkpoint", "CheckpointWriter", "Provenance", "TensorInfo", "check_not_input", "dtype_name",
           "open_checkpoint", "parse_dtype", "parse_size", "save_state_dict"]
