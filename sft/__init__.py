"""KnowZoom sft package."""
