"""The sans-I/O core: data and decisions, no clock, no randomness, no I/O."""
