"""Layer 2, files in and out: (embedding, location) datasets and their formats (``datasets``), the
memory-mapped on-disk store for large ones and the searches over it (``store``, ``index``), and
checkpoint directories of safetensors + JSON, written atomically and verified on load
(``checkpoint``).  Imports nothing of the package but ``checks``."""

from ..checks import validate_coords, validate_embeddings
from .checkpoint import (CheckpointError, checkpoint_step, latest_checkpoint, list_checkpoints, read_checkpoint,
                         remove_stale_temporaries, update_documents, write_checkpoint)
from .datasets import TAR_SEPARATOR, EmbeddingDataset, load_dataset, read_embeddings, read_image_csv
from .store import EmbeddingStore, StoreError, build_store, open_dataset, write_store

__all__ = ["EmbeddingDataset", "EmbeddingStore", "StoreError", "build_store", "write_store", "open_dataset",
           "load_dataset", "read_embeddings", "read_image_csv", "validate_coords", "validate_embeddings",
           "CheckpointError", "read_checkpoint", "write_checkpoint", "list_checkpoints", "latest_checkpoint",
           "checkpoint_step", "remove_stale_temporaries", "update_documents",
           "TAR_SEPARATOR"]
