"""imprint: batch edit-friendly DDPM inversion and editing at dataset scale."""

__version__ = "0.1.0"


def read_table(out: str, table: str = "results", columns: list[str] | None = None):
    """The committed rows of one table of a job's output (local path or URL)
    as a pyarrow Table; safe while the job is still running. See
    `pipeline.store.committed_files` for the file list (DuckDB, polars)."""
    from .store import read_table as _read_table

    return _read_table(out, table, columns)


def __getattr__(name: str):
    # `pipeline.Editor` without importing torch and the models for `import pipeline`
    if name in ("Editor", "Code"):
        from . import editor

        return getattr(editor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
