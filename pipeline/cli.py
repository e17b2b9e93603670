"""The `knowzoom` command: `knowzoom <stage> [--config FILE.yaml] [--field value ...]`."""

from __future__ import annotations

import json
import logging
import os
import sys

from pipeline.core.config import config_help, load_config
from pipeline.core.errors import KnowZoomError
from pipeline.stages import STAGES, run_stage

USAGE = """usage: knowzoom <stage> [--config FILE.yaml] [--field value ...]
       knowzoom run [CONFIG.yaml]          (default: configs/tiny/pipeline.yaml)
       knowzoom <stage> --help             (fields, types, defaults)
       knowzoom plan CONFIG.yaml [--gpu_memory_gb N]   (per-stage, per-GPU memory estimate; no launch)

stages:
"""

DEFAULT_PIPELINE = "configs/tiny/pipeline.yaml"


def _usage() -> str:
    return USAGE + "\n".join(f"  {s.name:<15} {s.summary}" for s in STAGES.values())


def main(argv: list[str] | None = None) -> int:
    """The `knowzoom` command. A closed stdout (`knowzoom sft --help | head`) ends quietly, not in a traceback."""
    try:
        return _main(argv)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout at exit: let that write go nowhere
        return 141  # what a shell reports for SIGPIPE


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("KNOWZOOM_LOG", "INFO"), format="%(asctime)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name == "plan":
        from pipeline.plan import main as plan_main

        return plan_main(rest)
    if name not in STAGES:
        print(f"knowzoom: unknown stage {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        cls = STAGES[name].config_class()
    except ImportError as e:
        print(f"knowzoom {name}: cannot import its module ({e}); is the project installed (pip install -e .)?",
              file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        print(f"knowzoom {name}: {STAGES[name].summary}\n\nfields:\n{config_help(cls)}")
        return 0
    config_path = None
    if "--config" in rest:
        i = rest.index("--config")
        if i + 1 >= len(rest):
            print("knowzoom: --config needs a YAML file path", file=sys.stderr)
            return 2
        config_path = rest[i + 1]
        rest = rest[:i] + rest[i + 2:]
    elif any(a.startswith("--config=") for a in rest):
        a = next(a for a in rest if a.startswith("--config="))
        config_path = a.split("=", 1)[1]
        rest.remove(a)
    elif name == "run" and rest and not rest[0].startswith("-"):
        config_path, rest = rest[0], rest[1:]
    if name == "run" and config_path is None and os.path.exists(DEFAULT_PIPELINE):
        config_path = DEFAULT_PIPELINE
    try:
        cfg = load_config(cls, config_path, rest)
        summary = run_stage(name, cfg)
    except KnowZoomError as e:
        print(f"knowzoom {name}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the inputs name cannot be read/created: say which, no traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"knowzoom {name}: error: {e.strerror or e}{where}; check the paths in the config", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"knowzoom {name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    # over MCP stdio, stdout is the protocol channel: the summary goes to stderr like every log line
    out = sys.stderr if getattr(cfg, "transport", None) == "mcp-stdio" else sys.stdout
    print(json.dumps(summary, indent=2, default=str), file=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
