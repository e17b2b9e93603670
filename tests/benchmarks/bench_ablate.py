"""The paper's ablation on the tiny default with several seeds: (a) RL only, (b) + pre-warm, (c) + text cold
start, each trained once per seed on the same data and held-out set; prints the per-run table and
mean ± sd (min–max) per variant, with the knowledge family (operator questions whose answer needs a fact only
the text QA states) in its own columns. About 3 × 3 pipeline runs of CPU time (hours on 2 cores), so it is a
benchmark, not a test.

    python tests/benchmarks/bench_ablate.py                      # seeds 0 1 2, runs/tiny/ablate
    python tests/benchmarks/bench_ablate.py --seeds 0 1 --only c_coldstart_prewarm_rl
    python tests/benchmarks/bench_ablate.py --quick              # every training stage shortened (a smoke look)
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", default=[])
    ap.add_argument("--output_dir", default="runs/tiny/ablate")
    ap.add_argument("--quick", action="store_true", help="shorten every training stage (numbers mean little)")
    args = ap.parse_args()

    from pipeline.ablate import AblateConfig
    from pipeline.core.config import load_config
    from pipeline.stages import run_stage

    over: dict = {"output_dir": args.output_dir, "seeds": args.seeds, "only": args.only}
    if args.quick:
        over["overrides"] = {"sft_text": {"max_steps": 40}, "sft_prewarm": {"max_steps": 80},
                             "mine_hard": {"limit": 40}, "rl": {"max_steps": 4}, "eval": {"n_samples": 0,
                                                                                          "pass_k": [1]}}
    cfg = load_config(AblateConfig, "configs/tiny/ablate.yaml", over)
    out = run_stage("ablate", cfg)
    print(json.dumps(out.get("aggregates", out.get("rows")), indent=2, default=str))


if __name__ == "__main__":
    main()
