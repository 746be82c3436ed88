"""Where result rows go: the run directory (always) and W&B (optional)."""
