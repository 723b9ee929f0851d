"""``<out>/report.html``: one self-contained page, read top to bottom, derived from the data files alone.

Sections: the runs and their settings; the headline over-optimisation table (proxy against gold); every
reward per checkpoint with the proxy-vs-gold plot; generalisation (training against held-out prompts);
the cross-reward matrix; the KL from the base model with reward against sqrt(KL); diversity; reward
curves; image grids of the same prompts and noise across checkpoints. Plots and images are embedded as
base64 PNG; the page loads nothing else.

:func:`derive` (re)writes ``tables/``, ``plots/`` and ``report.html`` of a results folder.
"""

from __future__ import annotations

import base64
import html
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from rlbench.eval.suites import suite_tables
from rlbench.eval.tables import Table, all_tables, write_table

GRID_PROMPTS_TRAIN = 2  # prompts of the training set shown per run
GRID_PROMPTS_HELDOUT = 1  # prompts of each held-out set

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1250px;color:#222;
padding:0 1em;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
h3{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;margin:.6em 0;font-size:.82em}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4}tr:nth-child(even) td{background:#fafafa}
.caption{color:#555;font-size:.88em;max-width:1100px}
.plot{max-width:100%;border:1px solid #eee;margin:.4em 0}
.grid{display:inline-table;margin:.4em 1em .4em 0;vertical-align:top}
.grid caption{caption-side:top;text-align:left;font-size:.85em;font-weight:600;padding:.2em 0}
.grid td{text-align:center;padding:2px}.grid img{image-rendering:pixelated;display:block}
.notice{background:#fff6e0;border-left:3px solid #e0a800;padding:.3em .7em;font-size:.88em}
nav a{margin-right:1em;font-size:.9em}
details summary{cursor:pointer;color:#0366d6}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def table_html(table: Table, heading: str = "h2", anchor: str | None = None) -> str:
    head = f'<{heading} id="{anchor or table.name}">{_esc(table.title)}</{heading}>'
    if not len(table.display):
        return head + f'<p class="caption">{_esc(table.caption)}</p>'
    body = table.display.to_html(index=False, escape=True, border=0, na_rep="")
    return head + f'<p class="caption">{_esc(table.caption)}</p>' + body


def img_html(data: bytes, alt: str, cls: str = "plot", width: int | None = None, title: str = "") -> str:
    w = f' width="{width}"' if width else ""
    t = f' title="{_esc(title)}"' if title else ""
    return f'<img class="{cls}" alt="{_esc(alt)}"{w}{t} src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _plot(plots: dict[str, bytes], name: str, alt: str) -> str:
    return img_html(plots[name], alt) if name in plots else ""


def _runs_html(meta: dict[str, Any]) -> str:
    rows = []
    for r in meta["runs"]:
        rows.append({"run": r["name"], "algorithm": r["algorithm"], "trained on": r["trained_reward"],
                     "seed": r["seed"], "model": r["model"], "training prompts": r["train_prompts"],
                     "checkpoints": ", ".join(map(str, r["checkpoints"])) + f" (of {len(r['available'])})",
                     "eval sampler": f"{r['steps']} steps, eta {r['eta']:g}, guidance {r['guidance']:g}",
                     "training eta": f"{r['train_eta']:g}"})
    s = meta["settings"]
    sets = ", ".join(f"{p['name']} ({p['used']} of {p['total']})" for p in meta["prompt_sets"])
    rewards = pd.DataFrame([{"reward": r["label"], "version": r["version"], "role": r["role"],
                             "better": "higher" if r["higher_is_better"] else "lower",
                             "cached": "yes" if r["deterministic"] else "no (nondeterministic)"}
                            for r in meta["rewards"]])
    gold = meta.get("gold") or {}
    text = (f"<p>Prompt sets: {_esc(sets)}; {s['images_per_prompt']} images per prompt; eval seed {s['seed']} "
            "(image k of prompt p has the same initial and per-step noise at every checkpoint of every run, so the "
            "base model (checkpoint 0) and each checkpoint are compared image by image). "
            f"Diversity features: {_esc(meta.get('features') or 'none')}. "
            + (f"Gold rewards declared by the model: {_esc(', '.join(gold))}. " if gold else "")
            + f"rlbench {_esc(meta.get('rlbench', ''))}.</p>")
    notices = "".join(f'<p class="notice">{_esc(n)}</p>' for n in meta.get("notices", []))
    return (pd.DataFrame(rows).to_html(index=False, escape=True, border=0) + text + notices
            + "<h3>Rewards</h3>" + rewards.to_html(index=False, escape=True, border=0))


def _grids_html(folder: Path, scores: pd.DataFrame, meta: dict[str, Any]) -> str:
    """For each run: a few prompts of each set; rows = checkpoints, columns = images (same noise per column)."""
    out = []
    rewards = list(dict.fromkeys(scores["reward"]))
    for run in meta["runs"]:
        part = scores[scores["run"] == run["name"]]
        if not len(part):
            continue
        out.append(f"<h3>{_esc(run['name'])} <small>({_esc(run['algorithm'])} on {_esc(run['trained_reward'])})</small></h3>")
        sets = list(dict.fromkeys(part["prompt_set"]))
        roles = part.groupby("prompt_set")["set_role"].first()
        sets.sort(key=lambda s: roles.get(s) != "train")
        blocks: list[str] = []
        for s in sets:
            n = GRID_PROMPTS_TRAIN if roles.get(s) == "train" else GRID_PROMPTS_HELDOUT
            prompts = list(dict.fromkeys(part[part["prompt_set"] == s]["prompt"]))[:n]
            for prompt in prompts:
                sub = part[(part["prompt_set"] == s) & (part["prompt"] == prompt)]
                k = int(sub["image_index"].max()) + 1
                cells = [f'<caption>{_esc(prompt)} <small>({_esc(s)}'
                         f', {roles.get(s) or "held-out"})</small></caption>']
                for c in sorted(sub["checkpoint"].unique()):
                    row = [f"<th>{('external' if meta.get('external') else 'base') if c == 0 else f'epoch {int(c)}'}</th>"]
                    for i in range(k):
                        img = sub[(sub["checkpoint"] == c) & (sub["image_index"] == i)]
                        if not len(img):
                            row.append("<td></td>")
                            continue
                        path = folder / img["image"].iloc[0]
                        title = ", ".join(f"{r} {v:.3g}" for r, v in zip(img["reward"], img["score"]) if r in rewards)
                        data = path.read_bytes() if path.is_file() else b""
                        row.append(f"<td>{img_html(data, f'{prompt} #{i} epoch {c}', cls='', width=_width(data), title=title)}"
                                   "</td>" if data else "<td>missing</td>")
                    cells.append("<tr>" + "".join(row) + "</tr>")
                blocks.append('<table class="grid">' + "".join(cells) + "</table>")
        out.append("<div>" + "".join(blocks) + "</div>")
    return "".join(out)


def _width(png: bytes) -> int:
    """Display width: small images scaled up (pixelated), large ones down."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        w = im.size[0]
    return w * 3 if w <= 48 else (w * 2 if w <= 64 else min(w, 160))


def report_html(folder: Path, tables: dict[str, Table], plots: dict[str, bytes], scores: pd.DataFrame,
                meta: dict[str, Any]) -> str:
    runs = ", ".join(r["name"] for r in meta["runs"])
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        '<link rel="icon" href="data:,">',
        f"<title>rlbench eval: {_esc(runs)}</title><style>{CSS}</style></head><body>",
        f"<h1>rlbench evaluation</h1><p class=\"caption\">{_esc(runs)} · generated "
        f"{_esc(time.strftime('%Y-%m-%d %H:%M'))}</p>",
        "<nav>" + "".join(f'<a href="#{a}">{t}</a>' for a, t in [
            ("runs", "runs"), ("overoptimisation", "over-optimisation"), ("proxy_vs_gold", "per checkpoint"),
            ("generalisation", "generalisation"), ("cross_reward", "cross-reward"), ("kl", "KL"),
            ("diversity", "diversity"), ("curves", "curves"), ("images", "images")]
            + ([("suites", "suites")] if any(n.startswith("suite_") for n in tables) else [])) + "</nav>",
        '<h2 id="runs">Runs and settings</h2>', _runs_html(meta),
        table_html(tables["overoptimisation"]),
        table_html(tables["proxy_vs_gold"]), _plot(plots, "proxy_vs_gold.png", "proxy against gold"),
        table_html(tables["generalisation"]), _plot(plots, "generalisation.png", "generalisation"),
        table_html(tables["cross_reward"]),
        table_html(tables["kl"]), _plot(plots, "reward_vs_sqrt_kl.png", "reward against sqrt KL"),
        table_html(tables["diversity"]), _plot(plots, "diversity.png", "diversity"),
    ]
    if "seeds" in tables:
        parts.append(table_html(tables["seeds"]))
    suites = [t for name, t in tables.items() if name.startswith("suite_")]
    if suites:
        parts.append('<h2 id="suites">Evaluation suites</h2><p class="caption">Each suite in its paper\'s columns, '
                     "on its own prompts.</p>")
        parts += [table_html(t, "h3") for t in suites]
    parts.append('<h2 id="curves">Reward curves</h2><p class="caption">Mean per checkpoint on each prompt set, '
                 "against epochs (top) and reward queries (bottom).</p>")
    parts += [img_html(data, name) for name, data in plots.items() if name.startswith("reward_curve_")]
    parts.append('<h2 id="images">Images</h2><p class="caption">The same prompts and the same noise (one column per '
                 "image index) at every checkpoint: what the training did to the pictures. Hover an image for its "
                 "scores.</p>")
    parts.append(_grids_html(folder, scores, meta))
    summary = tables["summary"]
    parts.append(f"<h2>All numbers</h2><details><summary>{_esc(summary.title)} ({len(summary.display)} rows)"
                 f"</summary>{table_html(summary, 'h3', 'summary')}</details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def external_html(folder: Path, tables: dict[str, Table], scores: pd.DataFrame, meta: dict[str, Any]) -> str:
    """The report of ``rlbench eval --images``: the source, each suite's table, every number, a few images."""
    ext = meta["external"]
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">", '<link rel="icon" href="data:,">',
        f"<title>rlbench eval: {_esc(ext['source'])}</title><style>{CSS}</style></head><body>",
        "<h1>rlbench evaluation of external images</h1>",
        f"<p class=\"caption\">{_esc(ext['source'])} ({_esc(ext['layout'])} layout, {ext['images']} images; groups "
        f"{_esc(', '.join(ext['groups']))}) · generated {_esc(time.strftime('%Y-%m-%d %H:%M'))}</p>",
    ]
    parts += [f'<p class="notice">{_esc(n)}</p>' for n in meta.get("notices", [])]
    rewards = pd.DataFrame([{"reward": r["label"], "version": r["version"], "role": r["role"]} for r in meta["rewards"]])
    parts.append("<h2>Rewards</h2>" + rewards.to_html(index=False, escape=True, border=0))
    suites = [t for name, t in tables.items() if name.startswith("suite_")]
    if suites:
        parts.append('<h2 id="suites">Evaluation suites</h2>')
        parts += [table_html(t, "h3") for t in suites]
    parts.append(table_html(tables["summary"]))
    parts.append('<h2 id="images">Images</h2>')
    parts.append(_grids_html(folder, scores, meta))
    parts.append("</body></html>")
    return "\n".join(parts)


def _replace(folder: Path, name: str, fill) -> None:
    """Write ``folder/name`` (a directory) via a temporary sibling, then swap it in."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=folder))
    try:
        fill(tmp)
        final = folder / name
        if final.exists():
            trash = folder / f".{name}.old-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def derive(folder: str | Path) -> dict[str, Table]:
    """(Re)write ``tables/``, ``plots/`` and ``report.html`` of ``folder`` from its data files; the tables."""
    from rlbench.eval.results import load_results
    from rlbench.eval.plots import all_plots
    from rlbench.train.rundir import atomic_write_text

    folder = Path(folder)
    scores, kl, div, meta = load_results(folder)
    if meta.get("external"):  # rlbench eval --images: no runs, no checkpoints
        from rlbench.eval.tables import summary_table

        tables = {"summary": summary_table(scores), **suite_tables(scores, meta)}
        plots: dict[str, bytes] = {}
    else:
        tables = all_tables(scores, kl, div, meta)
        tables.update(suite_tables(scores, meta))  # each evaluation suite in its paper's layout
        plots = all_plots(tables, meta)

    def fill_tables(tmp: Path) -> None:
        for t in tables.values():
            write_table(t, tmp)

    def fill_plots(tmp: Path) -> None:
        for name, data in plots.items():
            (tmp / name).write_bytes(data)

    _replace(folder, "tables", fill_tables)
    _replace(folder, "plots", fill_plots)
    page = external_html(folder, tables, scores, meta) if meta.get("external") else report_html(
        folder, tables, plots, scores, meta)
    atomic_write_text(folder / "report.html", page)
    return tables
