"""streaming package (see README.md)."""
