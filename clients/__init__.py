"""clients package (see README.md)."""
