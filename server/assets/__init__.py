"""Package data: the embedded ``tiny-shapes`` model (see ``models/tiny`` in the repository)."""
