"""Storage helpers: atomic file and folder writes, hashing while copying, safe path checks."""

from torchrelay.shared.storage.atomic import (
    CopiedFile,
    atomic_write_bytes,
    atomic_writer,
    clean_temporaries,
    copy_and_hash,
    publish_dir,
    resolve_within,
    sha256_file,
    sync_tree,
    temp_sibling,
)

__all__ = [
    "CopiedFile",
    "atomic_write_bytes",
    "atomic_writer",
    "clean_temporaries",
    "copy_and_hash",
    "publish_dir",
    "resolve_within",
    "sha256_file",
    "sync_tree",
    "temp_sibling",
]
