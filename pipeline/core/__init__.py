"""The floor: errors, config machinery, records and their loaders, run bookkeeping, the launcher.

It imports nothing of this project above it (tests/test_architecture.py checks it)."""
