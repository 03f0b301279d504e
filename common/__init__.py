"""Small pieces every package shares: one-line user errors (exit 2) and atomic file writes."""
