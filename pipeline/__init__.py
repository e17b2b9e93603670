"""KnowZoom pipeline package."""
