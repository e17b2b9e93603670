"""KnowZoom rl package."""
