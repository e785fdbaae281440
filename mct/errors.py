"""Error classes raised on more than one floor of mct (fetch, checkpoint loading, networks); torch-free.

They live below every module that raises them, so a low module (e.g. :mod:`mct.nets.adm`) never imports a higher
one to name an error.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded as asked (wrong format, missing or mismatched tensors)."""


class ChecksumMismatch(ValueError):
    """A file's sha256 differs from its pin: a fetched file is discarded, a checkpoint is refused before loading."""
