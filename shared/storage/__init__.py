"""Storage: the layout of the shared storage, the typed files services hand each other through
it, and atomic writes, hashing while copying, safe path checks."""

from torchrelay.shared.storage.atomic import (
    CopiedFile,
    atomic_write_bytes,
    atomic_writer,
    clean_temporaries,
    copy_and_hash,
    copy_file_and_hash,
    copy_file_keeping_small,
    publish_dir,
    resolve_within,
    sha256_file,
    sync_tree,
    temp_sibling,
)
from torchrelay.shared.storage.files import (
    CorruptFile,
    MissingFile,
    ModelDescription,
    ModelLineage,
    RunResult,
    TensorSignature,
    Throughput,
)
from torchrelay.shared.storage.layout import Layout

__all__ = [
    "CopiedFile",
    "CorruptFile",
    "Layout",
    "MissingFile",
    "ModelDescription",
    "ModelLineage",
    "RunResult",
    "TensorSignature",
    "Throughput",
    "atomic_write_bytes",
    "atomic_writer",
    "clean_temporaries",
    "copy_and_hash",
    "copy_file_and_hash",
    "copy_file_keeping_small",
    "publish_dir",
    "resolve_within",
    "sha256_file",
    "sync_tree",
    "temp_sibling",
]
