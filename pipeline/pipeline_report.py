"""The pipeline's final report: one Markdown and one HTML page with a stage table, a before → after table of
what every stage measured (read from the stage's own outputs), the curves and plots, links to every output
and to the trajectory viewer.

Markdown tables end at the first line that is not a row, so the stage table is written in one piece and the
figures go into per-stage sections below it."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from pipeline.core.config import StageConfig
from pipeline.core.manifest import atomic_write_text

_SHOW = (".png", ".html", ".md", ".json", ".jsonl")


def _outputs(folder: Path, root: Path) -> list[Path]:
    if not folder.exists():
        return []
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and p.suffix in _SHOW and len(rel.parts) <= 2 and "checkpoint" not in str(rel):
            files.append(p)
    return files[:40]


def _rel(p: Path, base: Path) -> str:
    return os.path.relpath(p.resolve(), base.resolve())


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _pct(v: Any) -> str:
    return "–" if not isinstance(v, (int, float)) else f"{100 * v:.1f} %"


def _num(v: Any, fmt: str = "{:.3f}") -> str:
    return "–" if not isinstance(v, (int, float)) else fmt.format(v)


def eval_overall(out: Path | None) -> dict[str, Any]:
    """The `overall` block of an eval stage's results.json in OUT ({} when absent or unreadable)."""
    return ((_json(out / "results.json").get("metrics") or {}).get("overall") or {}) if out else {}


def _eval_rows(o: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(measure, before, after) rows of an eval's `overall` block; `b` (an earlier eval of another model on the
    same items, or {}) fills the before column."""
    rows = []
    keys = [("pass@1_macro", "Pass@1 macro"), ("pass@1_micro", "Pass@1 micro")]
    ks = sorted(int(k.split("@")[1].split("_")[0]) for k in o if k.startswith("pass@") and k.endswith("_macro"))
    if ks and ks[-1] > 1:
        keys.append((f"pass@{ks[-1]}_macro", f"Pass@{ks[-1]} macro"))
    keys += [("valid_zoom_rate", "valid zoom calls"), ("target_hit_rate", "zooms covering the target"),
             ("tool_error_rate", "tool error rate (per call)"), ("parse_failure_rate", "parse failures")]
    if o.get("read_rate") is not None:
        keys.append(("read_rate", "views read right (think names what the zoom shows)"))
    n = o.get("n")
    for k, label in keys:
        rows.append((f"{label}" + (f" (n={n})" if k == "pass@1_macro" and n else ""),
                     _pct(b.get(k)) if b else "", _pct(o.get(k))))
    return rows


def stage_measures(name: str, out: Path, before: Path | None = None) -> list[tuple[str, str, str]]:
    """What a stage measured, as (measure, before, after) rows, read from the files it wrote (for an eval,
    `before` is the folder of an earlier eval of the same items)."""
    rows: list[tuple[str, str, str]] = []
    if name == "sft":
        m = _json(out / "metrics.json")
        for key, label in (("eval", "held-out KG accuracy"), ("eval_train", "train KG accuracy (memorisation)"),
                           ("eval_rephrased", "held-out rephrasings of trained facts")):
            b, a = m.get(f"{key}_before"), m.get(f"{key}_after")
            if b or a:
                n = (a or b or {}).get("n", "?")
                chance = (a or b or {}).get("chance")
                prior = (a or b or {}).get("prior")
                note = (f", chance {_pct(chance)}" if chance else "") + (
                    f", answer prior {_pct(prior)}" if prior is not None else "")
                rows.append((f"{label} (n={n}{note})", _pct((b or {}).get("accuracy")),
                             _pct((a or {}).get("accuracy"))))
        for key, label in (("probe", "held-out scenes"),):
            b, a = m.get(f"{key}_before"), m.get(f"{key}_after")
            if b or a:
                for k, lab in (("valid_zoom_rate", "valid zoom calls"), ("target_hit_rate", "zooms covering target"),
                               ("pass@1_micro", "answer accuracy")):
                    rows.append((f"{label}: {lab}", _pct((b or {}).get(k)), _pct((a or {}).get(k))))
        if m.get("first_logged_loss") is not None:
            rows.append(("train loss (first → last log)", _num(m.get("first_logged_loss")),
                         _num(m.get("final_logged_loss"))))
        d = m.get("data") or {}
        if d:
            rows.append(("training examples (text / VQA)", "", f"{d.get('text_items', 0)} / {d.get('vqa_items', 0)}"))
    elif name == "rl":
        rows += _rl_rows(out)
    elif name == "eval":
        o = eval_overall(out)
        if o:
            rows += _eval_rows(o, eval_overall(before))
    elif name == "mine-hard":
        s = _json(out / "stats.json")
        if s:
            rows.append(("mined items → hard items", str(s.get("n_scored", s.get("n", ""))),
                         str(s.get("n_hard", s.get("hard", "")))))
    elif name == "make-scenes":
        s = _json(out / "summary.json")
        if s:
            rows.append(("VQA items (train / test)", "", f"{s.get('vqa_train')} / {s.get('vqa_test')}"))
    return rows


REWARD_KEYS = (("reward", "mean reward"), ("rewards/accuracy/mean", "accuracy reward"),
               ("rewards/tool_bonus/mean", "tool bonus"))


def _window(n_steps: int) -> int:
    """Steps averaged at each end of an RL log: 10, or half the log when it is shorter than 20 steps."""
    return max(1, min(10, n_steps // 2))


def reward_windows(out: Path) -> dict[str, tuple[float, float, int]]:
    """GRPO log key → (mean over the first w logged steps, mean over the last w, w), w = min(10, steps // 2),
    for the keys of REWARD_KEYS that an RL stage's `rewards.jsonl` in OUT logs on at least two steps."""
    path = out / "rewards.jsonl"
    if not path.exists():
        return {}
    logs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            logs.append(json.loads(line))
        except ValueError:
            continue
    windows = {}
    for key, _ in REWARD_KEYS:
        vals = [float(r[key]) for r in logs if isinstance(r.get(key), (int, float))]
        if len(vals) >= 2:
            w = _window(len(vals))
            windows[key] = (sum(vals[:w]) / w, sum(vals[-w:]) / w, w)
    return windows


def _rl_rows(out: Path) -> list[tuple[str, str, str]]:
    """Mean reward (and accuracy reward) over the first and the last 10 logged GRPO steps, and the rollouts'
    accuracy with the zoom on the target, off it, and by a uniform guess (a right answer that is no likelier on
    target than off it was not read from the view)."""
    from rl.plots import read_reward_log, view_accuracy

    windows = reward_windows(out)
    rows = [(f"{label} (first → last {windows[key][2]} steps)", _num(windows[key][0]), _num(windows[key][1]))
            for key, label in REWARD_KEYS if key in windows]
    logs = [r for r in read_reward_log(out / "rewards.jsonl") if "episodes/on_target_rate" in r]
    if len(logs) >= 2:
        w = _window(len(logs))
        first, last = view_accuracy(logs[:w]), view_accuracy(logs[-w:])
        for key, label in (("on", "rollouts right, zoom on the target"), ("off", "rollouts right, zoom off it or none"),
                           ("guess", "a uniform guess would be right")):
            rows.append((f"{label} (first → last {w} steps)", _pct(first[key]), _pct(last[key])))
    return rows


def eval_baselines(resolved: list[tuple[str, str, StageConfig]]) -> dict[str, Path]:
    """stage id → output folder of the previous eval stage on the same items (same dataset, limit and
    categories): its model is the "before" of this eval's model (e.g. the probe before and after pre-warm)."""
    last: dict[tuple, Path] = {}
    out = {}
    for sid, name, scfg in resolved:
        if name != "eval":
            continue
        key = tuple(str(getattr(scfg, k, "")) for k in ("dataset", "dataset_path", "limit", "categories"))
        if key in last:
            out[sid] = last[key]
        last[key] = Path(scfg.output_dir)
    return out


def measures_markdown(resolved: list[tuple[str, str, StageConfig]]) -> list[str]:
    """The before → after table of every stage (empty when no stage measured anything)."""
    lines = ["| stage | measure | before | after |", "|---|---|---:|---:|"]
    n = 0
    base = eval_baselines(resolved)
    for sid, name, scfg in resolved:
        for measure, before, after in stage_measures(name, Path(scfg.output_dir), base.get(sid)):
            lines.append(f"| {sid} | {measure} | {before or '–'} | {after or '–'} |")
            n += 1
    return lines if n else []


def write_pipeline_report(
    cfg: StageConfig,
    resolved: list[tuple[str, str, StageConfig]],
    results: dict[str, Any],
    timings: dict[str, float],
) -> Path:
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    md = ["# KnowZoom pipeline report", "", f"Output root: `{root}`", "", "## Stages", "",
          "| stage | command | seconds | outputs |", "|---|---|---|---|"]
    for sid, name, scfg in resolved:
        out = Path(scfg.output_dir)
        res = results.get(sid)
        skipped = isinstance(res, dict) and res.get("skipped")
        md.append(f"| {sid} | `knowzoom {name}` | {timings.get(sid, '')}{' (cached)' if skipped else ''} | "
                  f"[{out}]({_rel(out, root)}) |")
    measures = measures_markdown(resolved)
    if measures:
        md += ["", "## What each stage changed (before → after)", "", *measures]
    sections, md_sections, html_measures = [], [], []
    base = eval_baselines(resolved)
    for sid, name, scfg in resolved:
        out = Path(scfg.output_dir)
        secs = timings.get(sid, "")
        res = results.get(sid)
        skipped = isinstance(res, dict) and res.get("skipped")
        files = _outputs(out, root)
        pngs = [f for f in files if f.suffix == ".png"]
        links = [f for f in files if f.suffix in (".html", ".md")]
        rows = stage_measures(name, out, base.get(sid))
        body = [f"<h2 id='{html.escape(sid)}'>{html.escape(sid)} <small>knowzoom {html.escape(name)}"
                f" — {secs} s{' (cached)' if skipped else ''}</small></h2>",
                f"<p>Outputs: <a href='{html.escape(_rel(out, root))}'>{html.escape(str(out))}</a></p>"]
        if rows:
            table = ("<table><tr><th>measure</th><th>before</th><th>after</th></tr>" + "".join(
                f"<tr><td>{html.escape(m)}</td><td>{html.escape(b or '–')}</td><td>{html.escape(a or '–')}</td></tr>"
                for m, b, a in rows) + "</table>")
            body.append(table)
            html_measures.append(f"<h3>{html.escape(sid)}</h3>" + table)
        if links:
            body.append("<ul>" + "".join(
                f"<li><a href='{html.escape(_rel(f, root))}'>{html.escape(f.name)}</a></li>" for f in links
            ) + "</ul>")
        for f in pngs[:6]:
            body.append(f"<figure><img src='{html.escape(_rel(f, root))}' style='max-width:720px'>"
                        f"<figcaption>{html.escape(f.name)}</figcaption></figure>")
        if res:
            body.append("<details><summary>summary</summary><pre>"
                        + html.escape(json.dumps(res, indent=2, default=str)[:6000]) + "</pre></details>")
        sections.append("\n".join(body))
        if pngs or links:
            md_sections += ["", f"### {sid}", ""]
            md_sections += [f"![{sid}: {f.name}]({_rel(f, root)})" for f in pngs[:6]]
            if pngs and links:
                md_sections.append("")
            md_sections += [f"- [{f.name}]({_rel(f, root)})" for f in links]
    if md_sections:
        md += ["", "## Curves, plots and outputs", *md_sections]
    md_path = root / "report.md"
    atomic_write_text(md_path, "\n".join(md) + "\n")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>KnowZoom pipeline report</title>"
            "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}small{color:#666}"
            "pre{background:#f6f6f6;padding:1em;overflow:auto}table{border-collapse:collapse;margin:.5em 0}"
            "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}</style></head><body>"
            "<h1>KnowZoom pipeline report</h1><ol>"
            + "".join(f"<li><a href='#{html.escape(s)}'>{html.escape(s)}</a></li>" for s, _, _ in resolved)
            + "</ol>"
            + ("<h2>What each stage changed (before → after)</h2>" + "".join(html_measures) if html_measures else "")
            + "\n".join(sections) + "</body></html>")
    atomic_write_text(root / "report.html", page)
    return md_path
