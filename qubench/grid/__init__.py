"""`qubench grid`: run a benchmark grid (tasks x methods x quantizers x seeds) with stage sharing,
resume after interruption, failure isolation, local or Ray executors, and seed aggregates."""
