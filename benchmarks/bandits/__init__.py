"""Contextual-bandit benchmarks driven through the /decide and /reward endpoints."""
