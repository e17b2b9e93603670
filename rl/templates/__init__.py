"""Chat templates shipped with the RL stage (package data)."""
