"""Training: loss under data x context parallelism."""
