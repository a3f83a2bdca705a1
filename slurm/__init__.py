"""slurm stage."""
