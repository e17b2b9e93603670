"""The zoom settings every stage that shows images to the model shares, under the same names (sft, rl, eval,
mine-hard): how many zoom calls an episode may make, the pixel bounds of every image shown, the box frame, and
the tool's read time limit. Each stage keeps its own checks; the tool's `ZoomConfig` is built from
`zoom_tool_kwargs()`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.core.config import StageConfig, hfield


@dataclass
class ZoomSettings(StageConfig):
    """Zoom fields of a stage (a base class beside LaunchConfig / StageConfig)."""

    max_zooms: int = hfield(4, help="Zoom calls allowed per episode; the answer turn comes on top (zoom protocol: "
                                    "max_zooms + 1 assistant turns; TRL max_tool_calling_iterations).")
    zoom_max_pixels: int = hfield(50176, help="Pixel cap of every image shown to the model, overview or crop "
                                              "(tiny: 224*224; 7B: 1003520 = 1280*28*28); the processor gets the same "
                                              "bounds, so it never resizes what the tool returns.")
    zoom_min_pixels: int = hfield(3136, help="Pixel floor of every image shown to the model (4*28*28).")
    zoom_frame: str = hfield("shown_pixels", help="Box frame the model uses: shown_pixels | norm1000.")
    zoom_read_timeout_s: float = hfield(10.0, help="Time limit of one raster read of the zoom tool (seconds).")

    def zoom_tool_kwargs(self) -> dict[str, Any]:
        """The zoom tool's `tools.zoom.ZoomConfig` fields these settings set."""
        return {"max_pixels": self.zoom_max_pixels, "min_pixels": self.zoom_min_pixels, "frame": self.zoom_frame,
                "max_turns": self.max_zooms, "read_timeout_s": self.zoom_read_timeout_s}
