"""``report.html``: one self-contained page with everything of an evaluation.

The page makes no request of its own: the CSS is inline, every picture (figures, thumbnails of
the misclassified images, Grad-CAM panels) is a ``data:`` URI, and there is no script at all.
Every string that comes from the user (node and display names, file paths, group ids,
provenance values, notes) is escaped with ``html.escape``, so a label such as ``<script>``
shows as text. It can be mailed, archived or opened offline as one file.

Sections (each an element with a fixed ``id``): ``provenance``, ``headline``, ``depth``,
``decisions``, ``per-class``, ``confusion``, ``roc``, ``calibration``, ``selective``,
``training``, ``groups``, ``errors``, ``notes``. A section whose data the evaluation lacks
says so in one line rather than disappearing, so a reader learns what could be shown.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hiercls.figures import FIGURE_NAMES, confusion_figure_name
from hiercls.io import atomic_write_text
from hiercls.report import (
    HEADLINE_DENOMINATORS,
    _denominator_text,
    _fmt,
    _headline,
    calibration_warnings,
    decision_name,
    display_parts,
    figure_names,
    provenance_rows,
    selective_choice,
)
from hiercls.report_content import SECTION_KEYS, report_sections
from hiercls.taxonomy import Taxonomy

__all__ = ["write_html_report", "render_html", "SECTION_IDS", "thumbnail_data_uri", "THUMBNAIL_PX", "MAX_THUMBNAILS"]

SECTION_IDS = ("provenance", "headline", "depth", "decisions", "per-class", "confusion", "roc", "calibration",
               "selective", "training", "groups", "errors", "notes")
THUMBNAIL_PX = 96
MAX_THUMBNAILS = 60

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;color:#1d2330;
background:#f6f7f9;line-height:1.4}
header{background:#1f3b5a;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:1.5em}
header p{margin:0;opacity:.85}
nav{padding:8px 28px;background:#e6ebf1;font-size:.9em}
nav a{margin-right:12px;color:#1f3b5a;text-decoration:none}
main{padding:8px 28px 40px;max-width:1400px}
section{background:#fff;border:1px solid #dde2e8;border-radius:6px;padding:12px 18px;margin:14px 0}
h2{margin:4px 0 10px;font-size:1.2em;color:#1f3b5a}
h3{font-size:1em;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:.88em}
th,td{border:1px solid #d4d9e0;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#eef1f5}
td.name,th.name{text-align:left}
tr.avg td{font-weight:600;background:#f5f7fa}
tr.chosen td{background:#fff3c4;font-weight:600}
td.diag{box-shadow:inset 0 0 0 2px #1f3b5a99}
td.zero{color:#aab2bd}
.scroll{overflow-x:auto;max-width:100%}
.muted{color:#67707d}
.wrong{color:#b3261e;font-weight:600}
.right{color:#1b7a33}
figure{display:inline-block;margin:6px 12px 6px 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #e1e5ea}
figcaption{font-size:.85em;color:#55606e}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #dde2e8;border-radius:5px;padding:6px;width:250px;font-size:.82em;background:#fbfcfd}
.card .top{display:flex;gap:8px}
.card .what{flex:1;min-width:0;overflow-wrap:anywhere}
.card img.thumb{width:96px;height:96px;object-fit:contain;flex:none;background:#eee}
.card .placeholder{width:96px;height:96px;flex:none;background:#e9ecef;color:#67707d;
display:flex;align-items:center;justify-content:center;text-align:center;font-size:.8em}
.card .file{word-break:break-all;color:#67707d;padding-top:4px}
.card img.cam{width:100%;margin-top:4px}
dl.prov{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:0}
dl.prov dt{font-weight:600;color:#3a4656}
dl.prov dd{margin:0;word-break:break-all}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    return _e(_fmt(value, digits))


def _img(png: bytes | None, alt: str, caption: str | None = None, mime: str = "image/png") -> str:
    if not png:
        return ""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:{mime};base64,{data}" alt="{_e(alt)}">{cap}</figure>'


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], name_columns: int = 1,
           row_classes: Sequence[str] | None = None) -> str:
    """A table; the first ``name_columns`` cells of each row are left-aligned names, the rest numbers."""
    head = "".join(f'<th class="name">{_e(h)}</th>' if k < name_columns else f"<th>{_e(h)}</th>"
                   for k, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        cls = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        cells = "".join(f'<td class="name">{_num(v)}</td>' if k < name_columns else f"<td>{_num(v)}</td>"
                        for k, v in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _section(section_id: str, heading: str, body: str) -> str:
    return f'<section id="{section_id}"><h2>{_e(heading)}</h2>{body}</section>'


def _absent(text: str) -> str:
    return f'<p class="muted">{_e(text)}</p>'


def _label(taxonomy: Taxonomy, node: str | None) -> str:
    """Display name, with the node's name in small print when they differ (escaped HTML)."""
    if node is None:
        return '<span class="muted">–</span>'
    shown, name = display_parts(taxonomy, node)
    return _e(shown) if name is None else f'{_e(shown)} <span class="muted">({_e(name)})</span>'


# -- sections ---------------------------------------------------------------------------------


def _provenance(evaluation: Any, metrics: dict[str, Any]) -> str:
    provenance = dict(getattr(evaluation, "provenance", None) or metrics.get("provenance") or {})
    for key in ("run", "checkpoint", "epoch", "split"):
        if metrics.get(key) is not None:
            provenance.setdefault(key, metrics[key])
    taxonomy = evaluation.taxonomy
    provenance.setdefault("taxonomy", f"{taxonomy.name} ({taxonomy.num_nodes} nodes, {len(taxonomy.leaves)} leaves, "
                                      f"depth {taxonomy.max_depth})")
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in provenance_rows(provenance))
    return _section("provenance", "Provenance", f'<dl class="prov">{items}</dl>')


def _headline_section(metrics: dict[str, Any]) -> str:
    groups = metrics.get("groups") if isinstance(metrics.get("groups"), dict) else None
    denominators = metrics.get("denominators") or {}
    header = ["metric", "images"] + (["groups" if groups.get("scoring") != "images" else "images, group vote"]
                                     if groups else []) + ["computed over"]
    group_rows = _headline(groups) if groups else None
    rows = []
    for k, (name, value) in enumerate(_headline(metrics)):
        row = [name, value] + ([group_rows[k][1]] if group_rows else [])
        rows.append(row + [_denominator_text(denominators.get(HEADLINE_DENOMINATORS[k] or ""))])
    if groups and groups.get("scoring") != "images":
        rows[0][2] = groups.get("n_groups")
    body = _table(header, rows)
    ci = metrics.get("ci")
    if isinstance(ci, dict) and ci:
        ci_rows = [(k, v.get("estimate"), v.get("low"), v.get("high")) for k, v in ci.items() if isinstance(v, dict)]
        if ci_rows:
            body += "<h3>Bootstrap intervals</h3>" + _table(["metric", "estimate", "low", "high"], ci_rows)
    return _section("headline", "Headline metrics", body)


def _depth_section(taxonomy: Taxonomy, metrics: dict[str, Any]) -> str:
    from hiercls.metrics import cut_classes

    denominators = metrics.get("denominators") or {}
    rows = [(d, cut_classes(taxonomy, int(d)), (denominators.get(f"depth_accuracy {d}") or {}).get("denominator"), v)
            for d, v in (metrics.get("depth_accuracy") or {}).items() if str(d).isdigit()]
    body = ('<p>The tree cut at depth d: every node counts as its ancestor at that depth.</p>'
            + _table(["depth", "classes", "images", "accuracy"], rows)) if rows else _absent("No depth accuracy.")
    return _section("depth", "Accuracy at each depth", body)


def _decisions_section(taxonomy: Taxonomy, metrics: dict[str, Any]) -> str:
    denominators = metrics.get("denominators") or {}
    own = metrics.get("decision_accuracy") or {}
    rows = [(decision_name(taxonomy, node, display=True),
             (denominators.get(f"decision {node}") or {}).get("denominator"), own.get(node), value)
            for node, value in (metrics.get("per_level_accuracy") or {}).items() if node in taxonomy.index]
    body = ("<p>Each decision among the images labelled below it: on its own subtree (most probable child "
            "whatever happened above) and end to end (a routing error higher up counts as a miss).</p>"
            + _table(["decision", "images", "own subtree", "end to end"], rows))
    return _section("decisions", "Accuracy of each decision", body)


def _per_class_section(taxonomy: Taxonomy, metrics: dict[str, Any]) -> str:
    per_class = metrics.get("per_class") or {}
    header = ["node", "precision", "recall", "F1", "support"]
    cells, classes = [], []
    for node, v in per_class.items():
        if node not in taxonomy.index:
            continue
        indent = "&nbsp;&nbsp;" * (taxonomy.depth(node) - 1)
        cells.append(f'<td class="name">{indent}{_label(taxonomy, node)}</td>'
                     + "".join(f"<td>{_num(v.get(k))}</td>" for k in ("precision", "recall", "f1", "support")))
        classes.append("")
    report = metrics.get("class_report")
    if isinstance(report, dict):
        for name in ("macro avg", "weighted avg"):
            avg = report.get(name) or {}
            cells.append(f'<td class="name">{_e(name)} (leaves)</td>'
                         + "".join(f"<td>{_num(avg.get(k))}</td>" for k in ("precision", "recall", "f1", "support")))
            classes.append("avg")
    head = "".join(f'<th class="name">{h}</th>' if k == 0 else f"<th>{h}</th>" for k, h in enumerate(header))
    body_rows = "".join(f'<tr class="{c}">{row}</tr>' if c else f"<tr>{row}</tr>" for row, c in zip(cells, classes))
    body = ("<p>An image belongs to a node when its label lies at or under it; support counts those images. "
            "The average rows are scikit-learn's classification_report over the leaves (macro: unweighted mean, "
            "weighted: by support; an undefined ratio counts as 0).</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body_rows}</tbody></table>")
    return _section("per-class", "Per-class precision, recall, F1", body)


def _shaded_cell(count: int, pct: float, diagonal: bool = False) -> str:
    """A count and its row percentage, shaded by the percentage (a zero stays pale and bare)."""
    classes = " ".join(c for c, on in (("diag", diagonal), ("zero", not count)) if on)
    cls = f' class="{classes}"' if classes else ""
    if not count:
        return f"<td{cls}>0</td>"
    shade = f"background:rgba(31,59,90,{min(1.0, pct / 100) * 0.55:.2f})" + (";color:#fff" if pct > 55 else "")
    return f'<td{cls} style="{shade}">{int(count)}<br><small>{pct:.0f}%</small></td>'


def _confusion_table(taxonomy: Taxonomy, cm: dict[str, Any]) -> str:
    labels = cm["labels"]
    outside = cm.get("outside") or [0] * len(labels)
    head = '<th class="name">true \\ predicted</th>' + "".join(f"<th>{_label(taxonomy, x)}</th>" for x in labels)
    head += ("<th>predicted elsewhere</th>" if any(outside) else "") + "<th>total</th>"
    rows = []
    for i, label in enumerate(labels):
        total = int(cm["row_totals"][i])
        cells = [_shaded_cell(count, float(pct), i == j)
                 for j, (count, pct) in enumerate(zip(cm["counts"][i], cm["row_percent"][i]))]
        if any(outside):
            cells.append(_shaded_cell(outside[i], 100.0 * outside[i] / max(total, 1)))
        rows.append(f'<tr><td class="name">{_label(taxonomy, label)}</td>{"".join(cells)}<td>{total}</td></tr>')
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'


def _confusion_section(taxonomy: Taxonomy, metrics: dict[str, Any], figures: dict[str, bytes]) -> str:
    matrices = metrics.get("confusion_matrices") or {}
    parts = figure_names(taxonomy.internal_nodes)
    blocks = []
    leaves = matrices.get("leaves")
    if leaves and leaves.get("n"):
        blocks.append(f"<h3>Leaves ({int(leaves['n'])} images labelled at a leaf)</h3>"
                      + _confusion_table(taxonomy, leaves)
                      + _img(figures.get(FIGURE_NAMES["confusion_leaves"]), "confusion matrix of the leaves"))
    for node, cm in (matrices.get("decisions") or {}).items():
        if node in taxonomy.index and cm.get("n"):
            name = decision_name(taxonomy, node, display=True)
            blocks.append(f"<h3>{_e(name)} ({int(cm['n'])} images)</h3>" + _confusion_table(taxonomy, cm)
                          + _img(figures.get(confusion_figure_name(parts[node])), f"confusion matrix of {name}"))
    body = ("<p>Rows are true labels, columns predictions; each cell holds a count and its share of the row.</p>"
            + "".join(blocks)) if blocks else _absent("No labelled image: no confusion matrix.")
    return _section("confusion", "Confusion matrices", body)


def _roc_section(taxonomy: Taxonomy, metrics: dict[str, Any], figures: dict[str, bytes]) -> str:
    auroc = metrics.get("auroc")
    if not isinstance(auroc, dict):
        return _section("roc", "ROC per leaf", _absent("No probabilities in these predictions: no ROC or AUROC."))
    rows = [(taxonomy.display_name(k) if k in taxonomy.index else k, v) for k, v in (auroc.get("leaves") or {}).items()]
    nodes = [(decision_name(taxonomy, n, display=True), v) for n, v in (auroc.get("nodes") or {}).items()
             if n in taxonomy.index]
    body = (_img(figures.get(FIGURE_NAMES["roc"]), "ROC curves per leaf") + _table(["leaf", "AUROC"], rows)
            + _table(["decision", "AUROC (mean over children)"], nodes))
    return _section("roc", "ROC per leaf", body)


def _calibration_section(metrics: dict[str, Any], figures: dict[str, bytes]) -> str:
    calibration = metrics.get("calibration")
    ece = metrics.get("ece")
    body = ""
    if isinstance(calibration, dict):
        before, after = (x if isinstance(x, dict) else {}
                         for x in (calibration.get("ece_before"), calibration.get("ece_after")))
        body += ("<p>Temperature scaling per internal node, fitted on validation images.</p>"
                 + _table(["", "ECE before", "ECE after"], [(k, v, after.get(k)) for k, v in before.items()]))
        temperatures = calibration.get("temperatures") or {}
        if temperatures:
            body += _table(["node", "temperature"], list(temperatures.items()))
        for note in calibration_warnings(calibration):
            body += f'<p class="wrong">{_e(note)}</p>'
    if isinstance(ece, dict) and ece.get("per_depth"):
        body += (f"<h3>Expected calibration error per depth ({_e(ece.get('n_bins'))} bins)</h3>"
                 + _table(["depth", "ECE", "images"],
                          [[d, v, (ece.get("n_per_depth") or {}).get(d)] for d, v in ece["per_depth"].items()]))
    body += _img(figures.get(FIGURE_NAMES["reliability"]), "reliability diagram")
    if not isinstance(calibration, dict):
        body += _absent("Not calibrated: run `hiercls calibrate` for temperatures and a reliability diagram.")
    return _section("calibration", "Calibration", body)


def _selective_section(metrics: dict[str, Any], figures: dict[str, bytes]) -> str:
    rows = [r for r in (metrics.get("selective") or []) if isinstance(r, dict)]
    if not rows:
        return _section("selective", "Selective prediction",
                        _absent("No coverage-accuracy table in this evaluation (it needs probabilities)."))
    target, chosen = selective_choice(metrics)
    line = ""
    if target is not None:
        line = (f"<p>Target accuracy {_e(f'{target:g}')}: "
                + (f"threshold <b>{_num(chosen)}</b> keeps it (highlighted).</p>" if chosen is not None
                   else "no threshold reaches it.</p>"))
    table = _table(["threshold", "coverage", "decided", "images", "accuracy", "hF"],
                   [(r.get("threshold"), r.get("coverage"), r.get("n_decided"), r.get("n"), r.get("accuracy"),
                     r.get("hF")) for r in rows],
                   name_columns=0,
                   row_classes=["chosen" if chosen is not None and r.get("threshold") == chosen else "" for r in rows])
    body = ("<p>The threshold decoder stops at an internal node when no child is sure enough. Coverage: the share "
            "of images decided down to a leaf; accuracy on those; hF on all images.</p>" + line
            + _img(figures.get(FIGURE_NAMES["coverage"]), "coverage against accuracy") + table)
    return _section("selective", "Selective prediction", body)


def _training_section(evaluation: Any, figures: dict[str, bytes]) -> str:
    png = figures.get(FIGURE_NAMES["training"])
    if png:
        return _section("training", "Training curves",
                        "<p>Losses and validation scores per epoch, from the run's metrics.jsonl.</p>"
                        + _img(png, "training curves"))
    why = "Evaluated from a predictions file: no training run to plot." if getattr(evaluation, "run_dir", None) is None \
        else "The run has no metrics.jsonl with finite numbers to plot."
    return _section("training", "Training curves", _absent(why))


def _groups_section(taxonomy: Taxonomy, metrics: dict[str, Any]) -> str:
    rows = metrics.get("group_votes")
    groups = metrics.get("groups") if isinstance(metrics.get("groups"), dict) else {}
    if not rows:
        return _section("groups", "Groups", _absent("No grouping (slide, patient) in this evaluation."))
    intro = (f"<p>{_e(groups.get('n_groups', len(rows)))} groups, diagnosed with "
             f"<code>{_e(groups.get('aggregator', 'mode'))}</code>; the votes are the images' predictions.</p>")
    body = []
    for r in rows:
        verdict = {True: '<span class="right">right</span>', False: '<span class="wrong">wrong</span>'}.get(
            r.get("correct"), '<span class="muted">no label</span>')
        votes = ", ".join(f"{_label(taxonomy, n)}&nbsp;<b>{int(c)}</b>" for n, c in (r.get("votes") or {}).items())
        body.append(f'<tr><td class="name">{_e(r.get("group"))}</td><td>{_num(r.get("n_images"))}</td>'
                    f'<td class="name">{_label(taxonomy, r.get("label"))}</td>'
                    f'<td class="name">{_label(taxonomy, r.get("prediction"))}</td><td>{verdict}</td>'
                    f'<td class="name">{votes}</td></tr>')
    head = ('<tr><th class="name">group</th><th>images</th><th class="name">label</th><th class="name">diagnosis</th>'
            '<th></th><th class="name">image votes</th></tr>')
    return _section("groups", "Groups: diagnoses and image votes",
                    intro + f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>")


def thumbnail_data_uri(path: str | Path, size: int = THUMBNAIL_PX) -> str | None:
    """A JPEG ``data:`` URI of the image downscaled to ``size`` px; ``None`` when it cannot be read."""
    from hiercls.data.images import open_rgb

    try:
        image = open_rgb(path)
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    except Exception:  # a moved, broken or hostile file: the card shows a placeholder instead
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _error_card(taxonomy: Taxonomy, row: dict[str, Any], panel: bytes | None, with_image: bool) -> str:
    uri = thumbnail_data_uri(row["path"]) if with_image and row.get("path") else None
    picture = (f'<img class="thumb" src="{uri}" alt="{_e(Path(str(row["path"])).name)}">' if uri
               else '<div class="placeholder">image not available</div>')
    along = " › ".join(f"{_label(taxonomy, n)}&nbsp;{_num(p, 2)}" for n, p in row.get("path_probabilities") or [])
    label_p = row.get("label_probability")
    label_line = f" <span class=\"muted\">(p {_num(label_p, 2)})</span>" if label_p is not None else ""
    cam = ""
    if panel:
        cam = (f'<img class="cam" src="data:image/png;base64,{base64.b64encode(panel).decode("ascii")}" '
               f'alt="Grad-CAM of {_e(Path(str(row["path"])).name)}">')
    return (f'<div class="card"><div class="top">{picture}<div class="what">'
            f'<div>true: <b>{_label(taxonomy, row.get("label"))}</b>{label_line}</div>'
            f'<div class="wrong">predicted: {along or _label(taxonomy, row.get("prediction"))}</div></div></div>'
            f'<div class="file">{_e(row.get("path", ""))}</div>{cam}</div>')


def _errors_section(taxonomy: Taxonomy, metrics: dict[str, Any], explain_panels: dict[str, bytes] | None) -> str:
    wrong = metrics.get("misclassified")
    if not isinstance(wrong, dict) or not wrong.get("n"):
        return _section("errors", "Misclassified images", _absent("No misclassified image."))
    panels = {str(k): v for k, v in (explain_panels or {}).items()}
    cards = [_error_card(taxonomy, row, panels.get(str(row.get("path"))), k < MAX_THUMBNAILS)
             for k, row in enumerate(wrong.get("rows") or [])]
    shown = f" (the first {int(wrong['shown'])} shown)" if wrong.get("shown", 0) < wrong["n"] else ""
    intro = (f"<p>{int(wrong['n'])} images misclassified{shown}. Probabilities are the marginals P(node | image) "
             "along the predicted path" + ("; the Grad-CAM panel shows each decision's evidence" if panels else "")
             + ".</p>")
    return _section("errors", "Misclassified images", intro + f'<div class="gallery">{"".join(cards)}</div>')


def _notes_section(metrics: dict[str, Any]) -> str:
    groups = metrics.get("groups") if isinstance(metrics.get("groups"), dict) else {}
    notes = list(metrics.get("notes") or []) + [f"groups: {n}" for n in groups.get("notes", [])]
    body = ("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>") if notes else _absent("No notes.")
    return _section("notes", "Notes", body)


# -- the page ---------------------------------------------------------------------------------


def _metrics_with_sections(evaluation: Any) -> dict[str, Any]:
    metrics = dict(evaluation.metrics or {})
    if any(metrics.get(k) is None for k in SECTION_KEYS) and getattr(evaluation, "predictions", None) is not None:
        computed = report_sections(evaluation)
        metrics.update({k: v for k, v in computed.items() if metrics.get(k) is None})
    return metrics


def render_html(evaluation: Any, *, title: str = "Evaluation report", figures: dict[str, bytes] | None = None,
                explain_panels: dict[str, bytes] | None = None) -> str:
    """The page's HTML text (see the module docstring)."""
    figures = figures or {}
    taxonomy = evaluation.taxonomy
    metrics = _metrics_with_sections(evaluation)
    provenance = getattr(evaluation, "provenance", None) or {}
    subtitle = " · ".join(_e(provenance[k]) for k in ("run", "strategy", "backbone", "date") if provenance.get(k))
    sections = [
        _provenance(evaluation, metrics), _headline_section(metrics), _depth_section(taxonomy, metrics),
        _decisions_section(taxonomy, metrics), _per_class_section(taxonomy, metrics),
        _confusion_section(taxonomy, metrics, figures), _roc_section(taxonomy, metrics, figures),
        _calibration_section(metrics, figures), _selective_section(metrics, figures),
        _training_section(evaluation, figures), _groups_section(taxonomy, metrics),
        _errors_section(taxonomy, metrics, explain_panels), _notes_section(metrics),
    ]
    nav = "".join(f'<a href="#{s}">{_e(s.replace("-", " "))}</a>' for s in SECTION_IDS)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            # No request may leave the page: everything it shows is inline.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{_e(title)}</h1><p>{subtitle}</p></header><nav>{nav}</nav>"
            f"<main>{''.join(sections)}</main></body></html>\n")


def write_html_report(evaluation: Any, out_dir: str | Path, *, title: str = "Evaluation report",
                      figures: dict[str, bytes] | None = None,
                      explain_panels: dict[str, bytes] | None = None) -> Path:
    """Write ``OUT/report.html`` (atomically) for an ``Evaluation``-like object; return its path.

    ``figures`` maps the file names of ``hiercls.figures`` (``report_figures``) to PNG bytes;
    ``explain_panels`` maps an image's path (as in the predictions) to its Grad-CAM panel PNG.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = render_html(evaluation, title=title, figures=figures, explain_panels=explain_panels)
    return atomic_write_text(out_dir / "report.html", text)
