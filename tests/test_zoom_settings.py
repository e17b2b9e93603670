"""One zoom-settings block (pipeline/core/zoom_settings.py) under the same names in every stage that shows images
to the model (issue #17); the old per-stage names are refused with the new name, as `max_turns` is."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.core.config import config_from_dict
from pipeline.core.errors import ConfigError
from pipeline.core.zoom_settings import ZoomSettings
from pipeline.stages import STAGES

ZOOM_STAGES = ("sft", "rl", "eval", "mine-hard")
ZOOM_FIELDS = [f.name for f in dataclasses.fields(ZoomSettings) if f.name not in ("output_dir", "seed")]


@pytest.mark.parametrize("stage", ZOOM_STAGES)
def test_every_zoom_stage_has_the_block_under_the_same_names(stage: str) -> None:
    cls = STAGES[stage].config_class()
    assert issubclass(cls, ZoomSettings)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert ZOOM_FIELDS == ["max_zooms", "zoom_max_pixels", "zoom_min_pixels", "zoom_frame", "zoom_read_timeout_s"]
    for name in ZOOM_FIELDS:
        assert fields[name].type == {f.name: f.type for f in dataclasses.fields(ZoomSettings)}[name]
    cfg = cls()
    from tools.zoom import ZoomConfig

    zc = ZoomConfig(**cfg.zoom_tool_kwargs())
    assert (zc.max_pixels, zc.min_pixels, zc.frame, zc.max_turns, zc.read_timeout_s) == (
        cfg.zoom_max_pixels, cfg.zoom_min_pixels, cfg.zoom_frame, cfg.max_zooms, cfg.zoom_read_timeout_s)


@pytest.mark.parametrize("stage, old, new, value", [
    ("sft", "frame", "zoom_frame", "norm1000"),
    ("sft", "max_pixels", "zoom_max_pixels", 50176),
    ("sft", "min_pixels", "zoom_min_pixels", 3136),
    ("rl", "frame", "zoom_frame", "norm1000"),
    ("rl", "tool_read_timeout_s", "zoom_read_timeout_s", 5.0),
])
def test_old_zoom_names_are_refused_with_the_new_name(stage: str, old: str, new: str, value: object) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(STAGES[stage].config_class(), {old: value}, check=False)
    assert f"{old}: unknown field" in str(e.value) and new in str(e.value)


def test_sft_keeps_its_own_max_zooms_default() -> None:
    """SFT's oracle trajectories zoom once per target region, up to 5 (its default before the block)."""
    assert STAGES["sft"].config_class()().max_zooms == 5
    assert STAGES["rl"].config_class()().max_zooms == STAGES["eval"].config_class()().max_zooms == 4
