"""training: see README.md for the module map."""
