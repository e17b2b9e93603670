"""The text cold start of a finished `knowzoom run`, repeated over seeds and step budgets, several runs at once.

    python tests/gpu/text_seeds.py --run_dir RUN --out DIR --seeds 0,1,2 --steps 200,1000 [--parallel 9]

Each (seed, steps) pair runs `knowzoom sft` with RUN/sft_text/config.yaml (same data, base model and settings;
only `seed`, `max_steps` and `output_dir` change) in its own process. A finished run's held-out, training and
rephrasing scores go to DIR/text_seeds.json as soon as it ends, so a run cut off by `--timeout` loses only the
pairs still running. `--data_root NEW` reads the config's files under NEW instead of RUN (a copy of the run's
`base/`, `qa/` and `scenes/` taken to another machine). Extra `--set key=value` pairs go to every run.

Made for a GPU, where the tiny model's steps are cheap: it asks whether the text stage's facts form with more
steps or more seeds (docs/tiny_model.md, "Text cold start").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _remap(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str) and value.startswith(old):
        return new + value[len(old):]
    if isinstance(value, list):
        return [_remap(v, old, new) for v in value]
    return value


def _scores(metrics: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: metrics.get(k) for k in ("global_step", "train_runtime_s", "first_logged_loss",
                                                       "final_logged_loss", "loss_history")}
    for key in ("eval_after", "eval_train_after", "eval_rephrased_after"):
        ev = metrics.get(key) or {}
        out[key] = {"n": ev.get("n"), "accuracy": ev.get("accuracy"), "chance": ev.get("chance"),
                    "by_qtype": {q: d.get("accuracy") for q, d in (ev.get("by_qtype") or {}).items()}}
    return out


def main(argv: list[str] | None = None) -> int:
    import yaml

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run_dir", required=True, help="a finished knowzoom run (its sft_text/config.yaml)")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", default="200")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--timeout", type=float, default=0, help="seconds for the whole matrix (0: none)")
    p.add_argument("--data_root", default="", help="where the run's base/, qa/ and scenes/ are now")
    p.add_argument("--set", action="append", default=[], help="key=value for every run")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    cfg = yaml.safe_load((run_dir / "sft_text" / "config.yaml").read_text())
    old = str(cfg["output_dir"]).rsplit("/sft_text", 1)[0]
    if args.data_root:
        cfg = {k: _remap(v, old, str(Path(args.data_root).resolve())) for k, v in cfg.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "sft_text_config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    jobs = [(int(s), int(n)) for n in args.steps.split(",") for s in args.seeds.split(",")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    results: dict[str, Any] = {"config": str(cfg_path), "runs": []}
    running: list[tuple[tuple[int, int], subprocess.Popen[bytes], float]] = []
    t0 = time.time()
    deadline = t0 + args.timeout if args.timeout else float("inf")

    def write() -> None:
        (out / "text_seeds.json").write_text(json.dumps(results, indent=2))

    while jobs or running:
        while jobs and len(running) < args.parallel:
            seed, steps = jobs.pop(0)
            d = out / f"s{seed}_n{steps}"
            cmd = [sys.executable, "-m", "pipeline.cli", "sft", "--config", str(cfg_path), "--seed", str(seed),
                   "--max_steps", str(steps), "--output_dir", str(d)]
            for kv in args.set:
                k, _, v = kv.partition("=")
                cmd += [f"--{k}", v]
            log = open(out / f"s{seed}_n{steps}.log", "wb")  # noqa: SIM115 - closed with the process
            running.append(((seed, steps), subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                            cwd=ROOT), time.time()))
        time.sleep(1.0)
        for item in list(running):
            (seed, steps), proc, started = item
            if proc.poll() is None and time.time() < deadline:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            running.remove(item)
            row: dict[str, Any] = {"seed": seed, "steps": steps, "exit": proc.returncode,
                                   "seconds": round(time.time() - started, 1)}
            mpath = out / f"s{seed}_n{steps}" / "metrics.json"
            if proc.returncode == 0 and mpath.exists():
                row.update(_scores(json.loads(mpath.read_text())))
            results["runs"].append(row)
            write()
        if time.time() >= deadline:
            results["cut_off"] = [{"seed": s, "steps": n} for s, n in jobs]
            jobs = []
    results["seconds"] = round(time.time() - t0, 1)
    write()
    for r in results["runs"]:
        reph = (r.get("eval_rephrased_after") or {}).get("accuracy")
        train = (r.get("eval_train_after") or {}).get("accuracy")
        print(f"seed {r['seed']} steps {r['steps']}: exit {r['exit']} {r['seconds']} s, train {train}, "
              f"rephrasings {reph}")
    return 0 if all(r["exit"] == 0 for r in results["runs"]) and not results.get("cut_off") else 1


if __name__ == "__main__":
    raise SystemExit(main())
