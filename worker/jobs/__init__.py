"""Built-in jobs, found by name."""
