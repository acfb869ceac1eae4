"""export package (see README.md)."""
