"""scoring: see README.md for the module map."""
