"""What every floor runs on: the per-layer KV cache, SDPA's one switch, sampling, the CPU kernels and their native
code, and the facts about this machine (CPU flags, cache folder, dtype policy)."""
