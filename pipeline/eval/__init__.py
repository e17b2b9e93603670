"""Evaluation: the eval and mine-hard stages, benchmarks, metrics and reports, figures, the viewer.

Imports pipeline.core, tools, rl, sft; never the roof (cli, runner, stages)."""
