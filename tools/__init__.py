"""KnowZoom tools package."""
