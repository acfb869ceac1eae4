"""training package (see README.md)."""
