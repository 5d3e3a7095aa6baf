"""Names shared by compiled modules and the runtime that loads them (the module's ABI)."""

METADATA_FUNC = "psb_metadata"  # Relax function returning the metadata JSON inside every module
