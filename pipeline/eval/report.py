"""Evaluation metrics and their reports: Pass@1 / Pass@k (unbiased estimator), micro and macro accuracy over
sub-tasks, a per-task table, tool-use statistics, parse failures; written as JSON, Markdown and a bar plot."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.core.datasets import subtask_name
from pipeline.core.records import ON_TARGET_COVER, Trajectory, VQASample


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1 (n={n}, c={c}, k={k})")
    if k > n:
        raise ValueError(f"k={k} exceeds the n={n} samples drawn; draw at least k samples")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def zoom_hits(trajectory: Trajectory, sample: VQASample, min_cover: float = ON_TARGET_COVER) -> tuple[int, int]:
    """(successful zooms, zooms whose native window covers >= min_cover of one of the sample's target boxes
    on the same image). A sample without targets counts no zoom as a hit."""
    zooms = hits = 0
    for o in trajectory.observations:
        if not o.get("parent"):  # the overviews the episode opened with
            continue
        zooms += 1
        x0, y0, x1, y1 = (float(v) for v in o["window"])
        for t in sample.targets or []:
            if int(t.image) != int(o.get("image_index", 0)):
                continue
            tx0, ty0, tx1, ty1 = (float(v) for v in t.bbox)
            area = max(tx1 - tx0, 0.0) * max(ty1 - ty0, 0.0)
            w, h = min(x1, tx1) - max(x0, tx0), min(y1, ty1) - max(y0, ty0)
            if area > 0 and w > 0 and h > 0 and w * h / area >= min_cover:
                hits += 1
                break
    return zooms, hits


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def compute_metrics(
    samples: list[VQASample],
    greedy: dict[str, Trajectory],
    sampled: dict[str, list[Trajectory]] | None = None,
    ks: list[int] | None = None,
    n_samples: int | None = None,
) -> dict[str, Any]:
    """Metrics over the samples that were scored. `greedy[id]` is the Pass@1 trajectory; `sampled[id]` the n
    sampled rollouts for Pass@k. Items whose episode errored are counted in `errors`, not scored. Pass@k is
    computed per item on its error-free rollouts; `overall` says on how many items each k was computed
    (`pass@k_items`), how many rollouts errored (`sampled_errors`) and how many items have fewer than
    `n_samples` scored rollouts (`items_missing_rollouts`: such a run is not reportable)."""
    from tools.protocol import reads_view

    sampled = sampled or {}
    ks = sorted(set(ks or []))
    k_items: dict[int, int] = {k: 0 for k in ks if k > 1}
    sampled_errors = missing_rollouts = 0
    per_task: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    answers: dict[str, list[str]] = defaultdict(list)  # each task's gold answers: what one answer always gets
    items = []
    for s in samples:
        task = subtask_name(s.category)
        g = greedy.get(s.id)
        row: dict[str, Any] = {"id": s.id, "task": task}
        if g is not None and g.error is None:
            row.update(correct=bool(g.correct), prediction=g.prediction,
                       parse_failure=bool(g.meta.get("parse_failure")), tool_calls=g.tool_calls,
                       tool_errors=g.tool_errors, truncated=g.truncated, turns=g.turns)
            t = per_task[task]
            t["pass@1"].append(1.0 if g.correct else 0.0)
            answers[task].append(str(s.answer).strip().upper())
            t["parse_failure"].append(1.0 if row["parse_failure"] else 0.0)
            t["tool_calls"].append(float(g.tool_calls))
            t["tool_errors"].append(float(g.tool_errors))
            # attempts: a malformed call is counted as an error but not as a call by the agent, so the rate's
            # denominator is every attempt (successful views + errors), never below the calls counted
            opened = sum(1 for o in g.observations if o.get("parent"))
            row["attempts"] = max(g.tool_calls, opened + g.tool_errors)
            t["attempts"].append(float(row["attempts"]))
            t["zoomed"].append(1.0 if g.tool_calls > 0 else 0.0)
            t["truncated"].append(1.0 if g.truncated else 0.0)
            sees = s.meta.get("sees") if isinstance(s.meta, dict) else None
            if sees:  # make-scenes says what the site's zooms show: did the answer think name exactly that?
                row["read"] = reads_view(g.final_text, sees)
                t["read"].append(1.0 if row["read"] else 0.0)
            if s.targets:
                zooms, hits = zoom_hits(g, s)
                row.update(zooms_ok=zooms, zoom_hits=hits)
                t["zooms_ok"].append(float(zooms))
                t["zoom_hits"].append(float(hits))
        elif g is not None:
            row["error"] = g.error
            per_task[task]["errors"].append(1.0)
        got = sampled.get(s.id, [])
        rollouts = [r for r in got if r.error is None]
        sampled_errors += len(got) - len(rollouts)
        if n_samples and len(rollouts) < n_samples:
            missing_rollouts += 1
            row["missing_rollouts"] = n_samples - len(rollouts)
        if rollouts:
            n, c = len(rollouts), sum(1 for r in rollouts if r.correct)
            row.update(n_samples=n, n_correct=c)
            per_task[task]["sampled_acc"].append(c / n)
            for k in ks:
                if 1 < k <= n:
                    per_task[task][f"pass@{k}"].append(pass_at_k(n, c, k))
                    k_items[k] += 1
        items.append(row)
    metric_names = ["pass@1"] + [f"pass@{k}" for k in ks if k > 1] + (["sampled_acc"] if sampled else [])
    tasks = {}
    for task in sorted(per_task):
        t = per_task[task]
        calls, errs = sum(t["attempts"]), sum(t["tool_errors"])
        tasks[task] = {
            "n": len(t["pass@1"]),
            **{m: _mean(t[m]) for m in metric_names},
            "parse_failure_rate": _mean(t["parse_failure"]),
            "tool_calls_per_question": _mean(t["tool_calls"]),
            "zoom_rate": _mean(t["zoomed"]),
            "tool_error_rate": errs / calls if calls else 0.0,
            "truncated_rate": _mean(t["truncated"]),
            "target_hit_rate": sum(t["zoom_hits"]) / sum(t["zooms_ok"]) if sum(t["zooms_ok"]) else None,
            "read_rate": _mean(t["read"]),
            # the Pass@1 of giving the task's most common answer every time (a model that ignores the image
            # and writes one letter can score this much, more than 1/k when the answers are unbalanced)
            "answer_prior": (max(answers[task].count(a) for a in set(answers[task])) / len(answers[task])
                             if answers[task] else None),
            "errors": int(sum(t["errors"])),
        }
    scored = [r for r in items if "correct" in r]
    all_calls = sum(r["attempts"] for r in scored)
    zooms_ok = sum(r.get("zooms_ok", 0) for r in scored)
    zooms_all = sum(sum(1 for o in greedy[r["id"]].observations if o.get("parent")) for r in scored)
    errs_all = sum(r["tool_errors"] for r in scored)
    overall: dict[str, Any] = {"n": len(scored), "n_total": len(samples),
                               "errors": sum(1 for r in items if "error" in r)}
    for m in metric_names:
        vals = [v for task in per_task.values() for v in task[m]]
        overall[f"{m}_micro"] = _mean(vals)
        task_means = [v for t in tasks if (v := tasks[t][m]) is not None]
        overall[f"{m}_macro"] = _mean(task_means)
    for k, cnt in k_items.items():
        overall[f"pass@{k}_items"] = cnt
    if sampled or n_samples:
        overall.update(sampled_errors=sampled_errors, items_missing_rollouts=missing_rollouts)
    overall.update(
        parse_failures=sum(1 for r in scored if r["parse_failure"]),
        parse_failure_rate=_mean(1.0 if r["parse_failure"] else 0.0 for r in scored),
        tool_calls_per_question=_mean(r["tool_calls"] for r in scored),
        zoom_rate=_mean(1.0 if r["tool_calls"] else 0.0 for r in scored),
        tool_error_rate=sum(r["tool_errors"] for r in scored) / all_calls if all_calls else 0.0,
        truncated_rate=_mean(1.0 if r["truncated"] else 0.0 for r in scored),
        # a successful zoom opens a view; a malformed call or a rejected box counts an error (both attempts)
        valid_zoom_rate=(zooms_all / (zooms_all + errs_all)) if zooms_all + errs_all else None,
        target_hit_rate=(sum(r.get("zoom_hits", 0) for r in scored) / zooms_ok) if zooms_ok else None,
        read_rate=_mean(1.0 if r["read"] else 0.0 for r in scored if "read" in r),
    )
    return {"overall": overall, "tasks": tasks, "metrics": metric_names, "items": items}


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def markdown_report(result: dict[str, Any]) -> str:
    """A Markdown summary: headline scores, the per-task table, tool statistics."""
    o, metrics = result["metrics"]["overall"], result["metrics"]["metrics"]
    lines = [f"# Evaluation: {result.get('model', '?')} on {result.get('dataset', '?')}", ""]
    if not result.get("reportable", False):
        lines += [f"> **Not reportable**: {result.get('not_reportable_reason', '')}", ""]
    lines += [f"- protocol: `{result.get('protocol')}`, items scored: {o['n']} / {o['n_total']}, "
              f"episode errors: {o['errors']}", ""]
    lines += ["| metric | micro | macro | items |", "|---|---:|---:|---:|"]
    for m in metrics:
        n_items = o.get(f"{m}_items", o["n"] if m == "pass@1" else "–")
        lines.append(f"| {m} | {_pct(o[f'{m}_micro'])} | {_pct(o[f'{m}_macro'])} | {n_items} |")
    if "sampled_errors" in o:
        lines += ["", f"- sampled rollouts that errored: {o['sampled_errors']}; items missing rollouts: "
                      f"{o['items_missing_rollouts']}"]
    lines += ["", "## Per task", ""]
    # "read %": answers whose think names exactly what the zoom shows (samples whose meta says it, make-scenes')
    read = o.get("read_rate") is not None
    head = "| task | n | " + " | ".join(metrics) + " | parse fail % | zooms/q | tool err % | target hit % |"
    lines += [head + (" read % |" if read else "") + " one answer always % |",
              "|---|---:|" + "---:|" * (len(metrics) + 5 + read)]
    for task, t in result["metrics"]["tasks"].items():
        cells = " | ".join(_pct(t[m]) for m in metrics)
        zq = t["tool_calls_per_question"]
        lines.append(f"| {task} | {t['n']} | {cells} | {_pct(t['parse_failure_rate'])} | "
                     f"{'–' if zq is None else f'{zq:.2f}'} | {_pct(t['tool_error_rate'])} | "
                     f"{_pct(t.get('target_hit_rate'))} |" + (f" {_pct(t.get('read_rate'))} |" if read else "")
                     + f" {_pct(t.get('answer_prior'))} |")
    zq = o["tool_calls_per_question"]
    lines += ["", "## Tool use", "",
              f"- zoom calls per question: {'–' if zq is None else f'{zq:.2f}'}",
              f"- questions with at least one zoom: {_pct(o['zoom_rate'])} %",
              f"- tool error rate (errors per zoom attempt, malformed calls included): {_pct(o['tool_error_rate'])} %",
              f"- valid zoom calls (view opened / calls attempted): {_pct(o.get('valid_zoom_rate'))} %",
              f"- successful zooms covering the question's target region: {_pct(o.get('target_hit_rate'))} %",
              *([f"- views read right (the answer think names exactly what the zoom shows): "
                 f"{_pct(o['read_rate'])} %"] if read else []),
              f"- parse failures: {o['parse_failures']} ({_pct(o['parse_failure_rate'])} %)",
              f"- cut by the turn limit: {_pct(o['truncated_rate'])} %", ""]
    return "\n".join(lines)


def bar_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Per-task bar plot of Pass@1 (and the largest Pass@k when present), with the macro mean as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = result["metrics"]["tasks"]
    names = list(tasks)
    metrics = [m for m in result["metrics"]["metrics"] if m.startswith("pass@")]
    show = metrics[:1] + metrics[-1:] if len(metrics) > 1 else metrics
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 3.6), dpi=100)
    width = 0.8 / max(1, len(show))
    for j, m in enumerate(show):
        vals = [100 * (tasks[t][m] or 0.0) for t in names]
        ax.bar([i + j * width for i in range(len(names))], vals, width=width, label=m)
    prior = [(i, 100 * tasks[t]["answer_prior"]) for i, t in enumerate(names) if tasks[t].get("answer_prior")]
    if prior:  # what writing the task's most common answer every time would score
        ax.scatter([i + width * (len(show) - 1) / 2 for i, _ in prior], [v for _, v in prior], marker="_", s=400,
                   color="k", zorder=3, label="one answer always")
    macro = result["metrics"]["overall"].get("pass@1_macro")
    if macro is not None:
        ax.axhline(100 * macro, color="k", ls="--", lw=1, label=f"pass@1 macro {100 * macro:.1f}")
    ax.set_xticks([i + width * (len(show) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    title = f"{result.get('model', '')} · {result.get('protocol', '')}"
    if not result.get("reportable", False):
        title += " (not reportable)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_reports(result: dict[str, Any], out_dir: str | Path) -> dict[str, str]:
    """results.json, results.md and per_task.png in `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    (out / "results.md").write_text(markdown_report(result), encoding="utf-8")
    bar_plot(result, out / "per_task.png")
    return {"json": str(out / "results.json"), "markdown": str(out / "results.md"), "plot": str(out / "per_task.png")}


__all__ = ["zoom_hits", "pass_at_k", "compute_metrics", "markdown_report", "bar_plot", "write_reports"]
