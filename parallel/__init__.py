"""Sharding layers over MPI: process mesh, traced collectives, gradient redirections."""
