"""The entry of one rank of a multi-process stage: `python -m pipeline.launcher STAGE CONFIG RESULT FINGERPRINT`.

`pipeline.core.launch.launch` starts the ranks with this command; it lives in the roof because it looks the stage
up in the registry (pipeline/stages.py), which imports the launch library below it.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from pipeline.core.config import load_config
from pipeline.core.errors import KnowZoomError
from pipeline.core.launch import LaunchError, is_main_rank, rank
from pipeline.core.manifest import atomic_write_text, seed_everything
from pipeline.stages import STAGES


def _child(argv: list[str]) -> int:
    """Entry of one rank: load the resolved config, run the stage function, rank 0 writes its summary."""
    logging.basicConfig(level=os.environ.get("KNOWZOOM_LOG", "INFO"),
                        format=f"%(asctime)s [rank {rank()}] %(name)s: %(message)s")
    name, config_path, result_path, fingerprint = argv
    cls, func = STAGES[name].load()
    try:
        cfg = load_config(cls, config_path)
        if cfg.fingerprint() != fingerprint:
            raise LaunchError(f"{config_path} does not match the config the launcher was given (it was "
                              "edited while the stage started); rerun the command")
        seed_everything(cfg.seed)
        summary = func(cfg) or {}
    except KnowZoomError as e:
        print(f"knowzoom {name} [rank {rank()}]: error: {e}", file=sys.stderr)
        return 2
    if is_main_rank():
        atomic_write_text(result_path, json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1:]))
