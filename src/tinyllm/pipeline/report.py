"""The compression report: `report.md` and a self-contained `report.html` (plots embedded).

Built from a run's `state.json` alone, so `tinyllm report DIR` can rebuild it at any time.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from tinyllm.util.fs import write_text_atomic
from tinyllm.util.units import human_bytes

MiB = 2**20


def stage_rows(state: dict) -> list[dict[str, Any]]:
    """One row per model: the original, then every finished stage."""
    orig = state["original"]["eval"]
    rows = [
        {
            "stage": "0",
            "type": "original",
            "settings": state["recipe"]["model"],
            "eval": orig,
            "bytes": 2 * orig["params"],  # the float16 checkpoint: the size reference
            "seconds": None,
            "peak": None,
            "gates": None,
        }
    ]
    for s in state["stages"]:
        rows.append(
            {
                "stage": str(s["index"]),
                "type": s["type"],
                "settings": _settings(s),
                "eval": s["eval"],
                "bytes": s["weights_bytes"],
                "seconds": s["seconds"],
                "peak": s["peak_rss_bytes"],
                "gates": s.get("gates"),
            }
        )
    return rows


def gates_cell(gates: list[dict] | None) -> str:
    """'-' (no gates), 'pass (3)' or 'FAIL 1/3: kld<=0.1'."""
    if not gates:
        return "-"
    bad = [g["gate"] for g in gates if not g["passed"]]
    if not bad:
        return f"pass ({len(gates)})"
    return f"FAIL {len(bad)}/{len(gates)}: {', '.join(bad)}"


def task_names(state: dict) -> list[str]:
    """The tasks any row was scored on, in order of first appearance."""
    names: dict[str, None] = {}
    for e in [r["eval"] for r in stage_rows(state)] + [x.get("eval") or {} for x in exports(state)]:
        names.update(dict.fromkeys(e.get("tasks") or {}))
    return list(names)


def exports(state: dict) -> list[dict]:
    return state.get("exports") or []


def export_label(record: dict) -> str:
    """'gguf q4_0 (llama.cpp)': an export's format and type, and the runtime that scored it."""
    from tinyllm.export import DEFAULT_TYPES

    qtype = record["type"] or DEFAULT_TYPES.get(record["format"])  # hf takes none
    runtime = (record.get("eval") or {}).get("runtime")
    label = " ".join(x for x in (record["format"], qtype) if x)
    return label + (f" ({runtime})" if runtime else "")


def export_cells(record: dict, ppl0: float, size0: float, tasks: list[str]) -> list[str]:
    """An exported file's row of the stage table: its own scores through its runtime, or
    'not scored' (the reason in the settings column)."""
    e = record.get("eval") or {"not_scored": "state.json holds no scores for it"}
    if "not_scored" in e:
        dashes = ["-"] * (9 + len(tasks))
        return ["export", export_label(record), f"not scored: {e['not_scored']}", *dashes, "-"]
    size = record["bytes"]
    return [
        "export",
        export_label(record),
        record["path"],
        f"{e['perplexity']:.3f}",
        f"{e['perplexity'] / ppl0:.3f}",
        f"{e['kld']:.4f}",
        f"{e['top1_agreement']:.1%}",
        "-",
        "-",
        f"{size / MiB:.1f} MiB",
        f"{size / size0:.3f}",
        "-",
        f"{record['seconds'] + e.get('eval_seconds', 0):.1f}",
        "-",
        *(_task_cell(e, t) for t in tasks),
        gates_cell(record.get("gates")),
    ]


def _task_cell(e: dict, name: str) -> str:
    t = (e.get("tasks") or {}).get(name)
    if not t or t.get("accuracy") is None:
        return "-"
    return f"{t['accuracy']:.1%} ± {t.get('stderr') or 0:.1%}"


def _settings(stage: dict) -> str:
    """The few settings that identify a stage (the full config is in state.json)."""
    cfg = stage.get("settings", stage["config"])

    def show(v: Any) -> str:
        return (
            "{" + ", ".join(f"{k}={show(x)}" for k, x in v.items()) + "}"
            if isinstance(v, dict)
            else str(v)
        )

    return ", ".join(f"{k}={show(v)}" for k, v in cfg.items())


def markdown_table(state: dict) -> str:
    ppl0 = state["original"]["eval"]["perplexity"]
    size0 = 2 * state["original"]["eval"]["params"]
    tasks = task_names(state)
    head = "| stage | type | settings | ppl | x orig | KLD | top-1 | sparsity | params | size | "
    head += "x fp16 | bits/w | time s | peak RSS |" + "".join(f" {t} |" for t in tasks)
    lines = [head + " gates |", "|---" * (15 + len(tasks)) + "|"]
    for r in stage_rows(state):
        e = r["eval"]
        cells = [
            r["stage"],
            r["type"],
            r["settings"],
            f"{e['perplexity']:.3f}",
            f"{e['perplexity'] / ppl0:.3f}",
            "-" if e["kld"] is None else f"{e['kld']:.4f}",
            "-" if e["top1_agreement"] is None else f"{e['top1_agreement']:.1%}",
            f"{e['sparsity']:.1%}",
            f"{e['params'] / 1e6:.1f} M",
            f"{r['bytes'] / MiB:.1f} MiB",
            f"{r['bytes'] / size0:.3f}",
            f"{e['bits_per_weight']:.2f}",
            "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
            "-" if r["peak"] is None else f"{r['peak'] / 2**30:.2f} GiB",
            *(_task_cell(e, t) for t in tasks),
            gates_cell(r["gates"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for x in exports(state):
        lines.append("| " + " | ".join(export_cells(x, ppl0, size0, tasks)) + " |")
    return "\n".join(lines)


def gates_md(state: dict) -> str:
    """The gates section: every gate of every stage and the final ones, and why a run stopped."""
    groups = [(f"stage {s['index']} ({s['type']})", s.get("gates")) for s in state["stages"]]
    groups.append(("final (last stage, before export)", state.get("final_gates")))
    groups += [(f"final on export {export_label(x)}", x.get("gates")) for x in exports(state)]
    lines = [
        f"- {where}: {'pass' if g['passed'] else '**FAIL**'} `{g['gate']}`: {g['message']}"
        for where, gates in groups
        for g in gates or []
    ]
    if state.get("stopped"):
        lines = [f"**The run stopped:** {state['stopped']}", "", *lines]
    return "\n".join(lines) or "No gates."


def _exports_md(state: dict) -> str:
    if not state["exports"]:
        return "No exports."
    return "\n".join(
        f"- `{e['path']}` ({e['format']} {e['type'] or 'default'}): {e['bytes'] / MiB:.1f} MiB; "
        + _export_scored(e)
        for e in state["exports"]
    )


def _export_scored(record: dict) -> str:
    """How an exported file was scored: 'scored through llama.cpp' or 'not scored: why'."""
    e = record.get("eval")
    if e is None:
        return "not scored yet"
    if "not_scored" in e:
        return f"not scored: {e['not_scored']}"
    return f"scored through {e['runtime']} (its row in the table above)"


def layer_errors(state: dict) -> tuple[str, dict[str, float]] | None:
    """The stage with the most per-layer numbers (later on ties): (title, layer -> value)."""
    best = None
    for s in state["stages"]:
        rep = s.get("report") or {}
        for key, title in (
            ("layer_errors", "reconstruction error"),
            ("layer_sparsity", "sparsity"),
        ):
            if rep.get(key) and (best is None or len(rep[key]) >= len(best[1])):
                best = (f"stage {s['index']} ({s['type']}): per-layer {title}", rep[key])
    return best


def markdown(state: dict) -> str:
    recipe = yaml_dump(state["recipe"])
    versions = ", ".join(f"{k} {v}" for k, v in state["versions"].items())
    e = state["recipe"]["evaluation"]
    parts = [
        f"# tinyllm compression report: {state['recipe']['model']}",
        "",
        f"Recipe: `{state['source']}`. Evaluation: {e['windows']} windows x {e['seq_len']} tokens "
        f"of `{e['corpus']}`; KLD and top-1 agreement against the original. Size is the "
        "weights file on disk (the original: its float16 checkpoint size); bits/w is the harness's "
        "in-memory bits per linear weight; time and peak RSS are per stage.",
        "",
        markdown_table(state),
        "",
        "## Gates",
        "",
        gates_md(state),
        "",
        "## Exports",
        "",
        _exports_md(state),
        "",
        "## Recipe (every setting)",
        "",
        "```yaml",
        recipe.rstrip(),
        "```",
        "",
        f"Software: {versions}.",
        "",
    ]
    return "\n".join(parts)


def yaml_dump(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


# --- plots ---------------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_ppl_vs_size(state: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = stage_rows(state)
    xs = [r["bytes"] / MiB for r in rows]
    ys = [r["eval"]["perplexity"] for r in rows]
    ax.plot(xs, ys, "-", color="0.7", zorder=1)
    for r, x, y in zip(rows, xs, ys, strict=True):
        ax.scatter([x], [y], zorder=2, color="C3" if r["type"] == "original" else "C0")
        ax.annotate(f"{r['stage']}: {r['type']}", (x, y), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("weights on disk (MiB)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity against size, stage by stage")
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_layers(title: str, values: dict[str, float]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.08), 3.5))
    ax.bar(range(len(names)), [values[n] for n in names], color="C0")
    step = max(1, len(names) // 30)
    ax.set_xticks(range(0, len(names), step))
    ax.set_xticklabels(names[::step], rotation=90, fontsize=6)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def plot_cost(state: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = state["stages"]
    labels = [f"{s['index']}: {s['type']}" for s in stages]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
    a1.bar(labels, [s["seconds"] for s in stages], color="C1")
    a1.set_title("time per stage (s)")
    a2.bar(labels, [s["peak_rss_bytes"] / 2**30 for s in stages], color="C2")
    a2.set_title("peak RSS per stage (GiB)")
    for a in (a1, a2):
        a.tick_params(axis="x", rotation=30)
        a.grid(alpha=0.3, axis="y")
    return _png(fig)


def _md_table_html(md: str) -> str:
    rows = [line.strip("|").split("|") for line in md.splitlines() if not line.startswith("|---")]
    head, body = rows[0], rows[1:]
    cells = "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
    out = ["<table>", f"<tr>{cells}</tr>"]
    for r in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out).replace("<td>FAIL", '<td class="fail">FAIL')


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;
text-align:right}th{background:#f0f0f0}td:nth-child(2),td:nth-child(3){text-align:left}
pre{background:#f6f6f6;padding:1em;overflow:auto}img{max-width:100%}
.fail{color:#a00;font-weight:bold;background:#fdd}.pass{color:#070}"""


def html_report(state: dict) -> str:
    model = html.escape(state["recipe"]["model"])
    imgs = [plot_ppl_vs_size(state)]
    if state["stages"]:
        imgs.append(plot_cost(state))
    layers = layer_errors(state)
    if layers:
        imgs.append(plot_layers(*layers))
    figures = "\n".join(f'<p><img alt="plot" src="data:image/png;base64,{b}"></p>' for b in imgs)
    exports = "".join(
        f"<li><code>{html.escape(e['path'])}</code>: {e['bytes'] / MiB:.1f} MiB; "
        f"{html.escape(_export_scored(e))}</li>"
        for e in state["exports"]
    )
    versions = ", ".join(f"{k} {v}" for k, v in state["versions"].items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tinyllm report: {model}</title>
<style>{CSS}</style></head><body>
<h1>tinyllm compression report: {model}</h1>
<p>Recipe <code>{html.escape(state["source"])}</code>. KLD and top-1 agreement against the
original; size is the weights file on disk (the original: its float16 size); bits/w is the
harness's in-memory bits per linear weight; time and peak RSS per stage.</p>
{_md_table_html(markdown_table(state))}
{figures}
<h2>Gates</h2>{_gates_html(state)}
<h2>Exports</h2><ul>{exports or "<li>none</li>"}</ul>
<h2>Recipe (every setting)</h2><pre>{html.escape(yaml_dump(state["recipe"]))}</pre>
<p>Software: {html.escape(versions)}.</p>
</body></html>
"""


def _gates_html(state: dict) -> str:
    """The gates section as HTML: a failed gate in red, the reason a run stopped above."""
    groups = [(f"stage {s['index']} ({s['type']})", s.get("gates")) for s in state["stages"]]
    groups.append(("final", state.get("final_gates")))
    groups += [(f"final on export {export_label(x)}", x.get("gates")) for x in exports(state)]
    items = "".join(
        f'<li><span class="{"pass" if g["passed"] else "fail"}">'
        f"{'pass' if g['passed'] else 'FAIL'}</span> {html.escape(where)}: "
        f"<code>{html.escape(g['gate'])}</code>: {html.escape(g['message'])}</li>"
        for where, gates in groups
        for g in gates or []
    )
    stopped = state.get("stopped")
    head = f'<p class="fail">The run stopped: {html.escape(stopped)}</p>' if stopped else ""
    return head + (f"<ul>{items}</ul>" if items else "<p>No gates.</p>")


def stage_line(r: dict[str, Any]) -> str:
    """One finished stage of state.json as a line: its scores, size on disk and time."""
    e = r["eval"]
    return (
        f"stage {r['index']} {r['type']}: perplexity {e['perplexity']:.3f}, KLD {e['kld']:.4f}, "
        f"{human_bytes(r['weights_bytes'])} on disk, {r['seconds']:.0f} s"
        + ("" if not r.get("gates") else f", gates {gates_cell(r['gates'])}")
    )


def write_report(out: Path, state: dict | None = None) -> tuple[Path, Path]:
    """Write report.md and report.html into the run directory `out`."""
    out = Path(out)
    if state is None:
        state = load_state(out)
    write_text_atomic(out / "report.md", markdown(state))
    write_text_atomic(out / "report.html", html_report(state))
    return out / "report.md", out / "report.html"


def load_state(out: Path) -> dict:
    """The run's checked state.json (a clear error when it is missing or corrupt)."""
    from tinyllm.pipeline.recipe import RecipeError
    from tinyllm.pipeline.rundir import read_state

    state = read_state(Path(out))
    if state.get("original") is None:
        raise RecipeError(f"{out}: the run has not scored the original model yet: no report")
    return state
