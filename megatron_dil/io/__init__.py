"""File-level guarantees shared by every artifact: atomic publication and content verification."""
from megatron_dil.io.files import (IntegrityError, atomic_write_text, file_digest, file_record, publish, record_files,
                                   verify_file, verify_files)

__all__ = ["IntegrityError", "atomic_write_text", "file_digest", "file_record", "publish", "record_files",
           "verify_file", "verify_files"]
