"""The pipeline's final report: one Markdown and one HTML page that link every stage's outputs, show its
plots and summary, and point at the trajectory viewer."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from pipeline.config import StageConfig
from pipeline.manifest import atomic_write_text

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


def write_pipeline_report(
    cfg: StageConfig,
    resolved: list[tuple[str, str, StageConfig]],
    results: dict[str, Any],
    timings: dict[str, float],
) -> Path:
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    md = ["# KnowZoom pipeline report", "", f"Output root: `{root}`", "",
          "| stage | command | seconds | outputs |", "|---|---|---|---|"]
    sections = []
    for sid, name, scfg in resolved:
        out = Path(scfg.output_dir)
        secs = timings.get(sid, "")
        res = results.get(sid)
        skipped = isinstance(res, dict) and res.get("skipped")
        md.append(f"| {sid} | `knowzoom {name}` | {secs}{' (cached)' if skipped else ''} | "
                  f"[{out}]({_rel(out, root)}) |")
        files = _outputs(out, root)
        pngs = [f for f in files if f.suffix == ".png"]
        links = [f for f in files if f.suffix in (".html", ".md")]
        body = [f"<h2 id='{html.escape(sid)}'>{html.escape(sid)} <small>knowzoom {html.escape(name)}"
                f" — {secs} s{' (cached)' if skipped else ''}</small></h2>",
                f"<p>Outputs: <a href='{html.escape(_rel(out, root))}'>{html.escape(str(out))}</a></p>"]
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
        if res and not skipped:
            md.append("")
        for f in pngs[:6]:
            md.append(f"![{sid}: {f.name}]({_rel(f, root)})")
        for f in links:
            md.append(f"- {sid}: [{f.name}]({_rel(f, root)})")
    md_path = root / "report.md"
    atomic_write_text(md_path, "\n".join(md) + "\n")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>KnowZoom pipeline report</title>"
            "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}small{color:#666}"
            "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>"
            "<h1>KnowZoom pipeline report</h1><ol>"
            + "".join(f"<li><a href='#{html.escape(s)}'>{html.escape(s)}</a></li>" for s, _, _ in resolved)
            + "</ol>" + "\n".join(sections) + "</body></html>")
    atomic_write_text(root / "report.html", page)
    return md_path
