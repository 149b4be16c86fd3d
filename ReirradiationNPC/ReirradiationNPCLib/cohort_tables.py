"""Cohort tables and figures, built from the per-case ``results.json`` files (never from arrays).

- ``cohort.csv`` / ``cohort.parquet``: one row per case x constraint (:data:`CONSTRAINT_COLUMNS`, then the
  robustness columns when any case has them).
- ``cohort_summary.csv`` / ``cohort_summary.parquet``: one row per case (:data:`SUMMARY_COLUMNS`), failed cases
  with their one-line error.
- ``cohort.html``: self-contained (figures embedded as PNG): per organ and metric, the distribution of the
  cumulative values against the limit; per organ, the number of cases failing, with conditions not met, or
  incomplete; the per-case summary.
- ``cohort_errors.txt``: tracebacks of internal errors (only when there are any).

Fields that other parts of the engine add over time (``basis``, ``value_undiscounted``, ``value_credited``,
``course``, ``summary.verdict_code``, ``robustness``) are read with ``.get``: an older results.json gives empty cells.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import os
from pathlib import Path

# (column, type) with type one of str, float, bool, int: the Parquet schema and the CSV header
CONSTRAINT_COLUMNS = [
    ("case", str), ("patient_id", str), ("organ", str), ("structure", str), ("metric", str), ("scope", str),
    ("course", str), ("basis", str), ("value", float), ("unit", str), ("limit", float), ("status", str),
    ("verified", bool), ("value_undiscounted", float), ("value_credited", float), ("margin", float),
    ("alpha_beta", float), ("conditions_met", bool), ("priority", int), ("source", str),
]
ROBUSTNESS_COLUMNS = [
    ("robust_worst_value", float), ("robust_best_value", float), ("robust_worst_scenario", str),
    ("robust_status_worst", str), ("robust_scenarios", int),
]
SUMMARY_COLUMNS = [
    ("case", str), ("patient_id", str), ("state", str), ("error", str), ("verdict_code", str), ("verdict", str),
    ("incomplete_because", str), ("n_constraints", int), ("n_fail", int), ("n_warn", int),
    ("n_condition_not_met", int), ("n_not_evaluated", int), ("n_pass", int), ("n_warnings", int),
    ("registration", str), ("run_seconds", float), ("worker", str), ("software_version", str),
    ("engine_sha256", str), ("protocol_name", str), ("protocol_version", str), ("protocol_sha256", str),
    ("protocol_override", bool), ("inputs_sha256", str), ("case_sha256", str), ("case_file", str),
    ("output_dir", str), ("resume_reason", str),
]


# ------------------------------------------------------------------------------------------------ rows

def _num(v):
    if isinstance(v, bool) or v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def constraint_rows(case: str, res: dict) -> list[dict]:
    patient = ((res.get("case") or {}).get("patient") or {}).get("id")
    rows = []
    for c in res.get("constraints") or []:
        conds = c.get("conditions")
        row = {
            "case": case, "patient_id": patient, "organ": c.get("organ"), "structure": c.get("structure"),
            "metric": c.get("metric"), "scope": c.get("scope"), "course": c.get("course"), "basis": c.get("basis"),
            "value": _num(c.get("value")), "unit": c.get("unit"), "limit": _num(c.get("limit")),
            "status": c.get("status"), "verified": c.get("verified"),
            "value_undiscounted": _num(c.get("value_undiscounted")), "value_credited": _num(c.get("value_credited")),
            "margin": _num(c.get("margin")), "alpha_beta": _num(c.get("alpha_beta")),
            "conditions_met": (all(bool(x.get("met")) for x in conds if isinstance(x, dict))
                               if isinstance(conds, list) and conds else None),
            "priority": c.get("priority"), "source": c.get("source"),
        }
        rob = c.get("robustness")
        if isinstance(rob, dict):
            sc = rob.get("scenarios")
            row.update({"robust_worst_value": _num(rob.get("worst_value")),
                        "robust_best_value": _num(rob.get("best_value")),
                        "robust_worst_scenario": None if rob.get("worst_scenario") is None
                        else str(rob.get("worst_scenario")),
                        "robust_status_worst": rob.get("status_worst"),
                        "robust_scenarios": len(sc) if isinstance(sc, (list, dict)) else
                        (int(sc) if isinstance(sc, (int, float)) and not isinstance(sc, bool) else None)})
        rows.append(row)
    return rows


def _registration_text(reg: dict) -> str:
    parts = []
    for name, q in sorted((reg or {}).items()):
        if not isinstance(q, dict):
            continue
        bits = [str(q.get("method"))]
        if q.get("mattes_mi_before") is not None and q.get("mattes_mi_after") is not None:
            bits.append(f"MI {q['mattes_mi_before']:.3f}->{q['mattes_mi_after']:.3f}")
        if q.get("rotation_deg") is not None:
            bits.append(f"rotation {q['rotation_deg']:.2f} deg")
        if q.get("translation_mm") is not None:
            bits.append("translation (" + ", ".join(f"{v:.1f}" for v in q["translation_mm"]) + ") mm")
        dice = q.get("dice")
        if isinstance(dice, dict) and dice:
            vals = [v for v in dice.values() if isinstance(v, (int, float))]
            if vals:
                bits.append(f"Dice min {min(vals):.2f} ({len(vals)} structures)")
        for k in ("folded_voxels", "jacobian_folded_voxels"):
            if q.get(k):
                bits.append(f"{q[k]} folded voxels")
        if q.get("notes"):
            bits.append(f"{len(q['notes'])} note(s)")
        parts.append(f"{name}: " + ", ".join(bits))
    return "; ".join(parts)


def _patient_from_case_file(path) -> str | None:
    if path is None:
        return None
    try:
        import yaml
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text) if Path(path).suffix.lower() == ".json" else yaml.safe_load(text)
        pid = (data.get("patient") or {}).get("id")
        return None if pid is None else str(pid)
    except Exception:  # noqa: BLE001 - the case is broken anyway; its error is reported
        return None


def summary_row(outcome, res: dict | None, out_dir: Path) -> dict:
    it = outcome.item
    row = {k: None for k, _ in SUMMARY_COLUMNS}
    row.update({"case": it.name, "state": outcome.state, "error": outcome.error,
                "case_file": None if it.case_file is None else str(it.case_file), "output_dir": str(out_dir),
                "run_seconds": outcome.seconds, "worker": outcome.worker, "resume_reason": outcome.resume_reason})
    if res is None:
        row["patient_id"] = _patient_from_case_file(it.case_file)
        return row
    summ = res.get("summary") or {}
    counts = summ.get("counts") or {}
    prov = res.get("provenance") or {}
    proto = res.get("protocol") or {}
    row.update({
        "patient_id": ((res.get("case") or {}).get("patient") or {}).get("id"),
        "verdict_code": summ.get("verdict_code"), "verdict": summ.get("verdict"),
        "incomplete_because": "; ".join(map(str, summ.get("incomplete_because") or [])) or None,
        "n_constraints": len(res.get("constraints") or []),
        "n_fail": counts.get("fail"), "n_warn": counts.get("warn"),
        "n_condition_not_met": counts.get("condition_not_met"), "n_not_evaluated": counts.get("not_evaluated"),
        "n_pass": counts.get("pass"), "n_warnings": len(res.get("warnings") or []),
        "registration": _registration_text(res.get("registration") or {}) or None,
        "software_version": (res.get("software") or {}).get("version"),
        "engine_sha256": (prov.get("software") or {}).get("engine_sha256"),
        "protocol_name": proto.get("name"), "protocol_version": None if proto.get("version") is None
        else str(proto.get("version")),
        "protocol_sha256": (prov.get("protocol") or {}).get("sha256"),
        "protocol_override": (prov.get("protocol") or {}).get("override"),
        "inputs_sha256": prov.get("inputs_sha256"),
        "case_sha256": ((prov.get("inputs") or {}).get("case") or {}).get("sha256"),
    })
    return row


# ------------------------------------------------------------------------------------------------ writing

def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def write_csv(path: Path, rows: list[dict], columns: list[tuple[str, type]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([c for c, _ in columns])
    for r in rows:
        w.writerow([_cell(r.get(c)) for c, _ in columns])
    _atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def _coerce(v, typ):
    if v is None:
        return None
    if typ is float:
        return _num(v)
    if typ is int:
        try:
            return None if isinstance(v, bool) else int(v)
        except (TypeError, ValueError):
            return None
    if typ is bool:
        return bool(v)
    return str(v)


def write_parquet(path: Path, rows: list[dict], columns: list[tuple[str, type]]) -> bool:
    """Write a Parquet file with a fixed schema; False when pyarrow is not installed."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return False
    types = {str: pa.string(), float: pa.float64(), bool: pa.bool_(), int: pa.int64()}
    table = pa.table({c: pa.array([_coerce(r.get(c), t) for r in rows], type=types[t]) for c, t in columns})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return True


def write_all(cohort, output: Path) -> dict[str, str]:
    """Read every complete case's results.json and write the cohort files into ``output``; return
    {file: description}. A case whose results.json cannot be read is turned into a failed case."""
    output = Path(output)
    c_rows, s_rows = [], []
    for o in cohort.outcomes:
        out_dir = output / o.item.name
        res = None
        if o.state != "failed":
            try:
                res = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                o.state, o.error = "failed", f"{out_dir / 'results.json'}: cannot be read ({exc})"
        s_rows.append(summary_row(o, res, out_dir))
        if res is not None:
            c_rows.extend(constraint_rows(o.item.name, res))
    ccols = list(CONSTRAINT_COLUMNS)
    if any("robust_worst_value" in r for r in c_rows):
        ccols += ROBUSTNESS_COLUMNS
    files = {}
    write_csv(output / "cohort.csv", c_rows, ccols)
    files["cohort.csv"] = "one row per case x constraint"
    write_csv(output / "cohort_summary.csv", s_rows, SUMMARY_COLUMNS)
    files["cohort_summary.csv"] = "one row per case: state, error, verdict, registration QA, versions, hashes"
    if write_parquet(output / "cohort.parquet", c_rows, ccols):
        files["cohort.parquet"] = "cohort.csv as Parquet (typed columns)"
        write_parquet(output / "cohort_summary.parquet", s_rows, SUMMARY_COLUMNS)
        files["cohort_summary.parquet"] = "cohort_summary.csv as Parquet"
    else:
        cohort.warnings.append("cohort.parquet not written: pyarrow is not installed "
                               "(pip install 'reirradiation-npc[cohort]')")
    _atomic_write_bytes(output / "cohort.html", render_html(cohort, s_rows, c_rows).encode("utf-8"))
    files["cohort.html"] = "cohort figures: cumulative values against limits per organ, failing cases per organ"
    errors = [o for o in cohort.outcomes if o.traceback]
    err_file = output / "cohort_errors.txt"
    if errors:
        text = "\n\n".join(f"== case {o.item.name} ({o.item.case_file})\n{o.traceback}" for o in errors)
        _atomic_write_bytes(err_file, text.encode("utf-8"))
        files["cohort_errors.txt"] = "tracebacks of internal errors"
    elif err_file.exists():
        err_file.unlink()  # from an earlier run; no longer true
    return files


# ------------------------------------------------------------------------------------------------ html

_COLOURS = {"fail": "#c62828", "warn": "#ef8f00", "pass": "#2e7d32", "condition_not_met": "#6a1b9a"}
_INCOMPLETE = ("not_evaluated",)


def organ_counts(c_rows: list[dict]) -> dict[str, dict[str, int]]:
    """Per organ: number of cases with a failing limit, with conditions not met (and no failure), incomplete
    (a constraint not evaluated or without a value, and neither of the former), and evaluated in total."""
    per: dict[str, dict[str, set]] = {}
    for r in c_rows:
        d = per.setdefault(r["organ"] or "-", {"cases": set(), "fail": set(), "cond": set(), "inc": set()})
        d["cases"].add(r["case"])
        if r["status"] == "fail":
            d["fail"].add(r["case"])
        elif r["status"] == "condition_not_met":
            d["cond"].add(r["case"])
        elif r["status"] in _INCOMPLETE or (r["value"] is None and r["status"] != "no_limit"):
            d["inc"].add(r["case"])
    out = {}
    for organ, d in sorted(per.items()):
        cond = d["cond"] - d["fail"]
        out[organ] = {"cases": len(d["cases"]), "failing": len(d["fail"]), "conditions_not_met": len(cond),
                      "incomplete": len(d["inc"] - d["fail"] - cond)}
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _distribution_figure(c_rows: list[dict]) -> str | None:
    """One panel per (organ, metric, unit) of cumulative rows: each case's value, the limit(s) as lines."""
    import numpy as np
    from matplotlib.figure import Figure  # object API only: no pyplot state, no backend switch
    groups: dict[tuple, list[dict]] = {}
    for r in c_rows:
        if r["scope"] == "cumulative" and r["value"] is not None:
            groups.setdefault((r["organ"], r["metric"], r["unit"]), []).append(r)
    if not groups:
        return None
    keys = sorted(groups)
    ncol = 3
    nrow = (len(keys) + ncol - 1) // ncol
    fig = Figure(figsize=(4.6 * ncol, 1.9 * nrow + 0.4))
    rng = np.random.default_rng(0)  # fixed jitter: the same cohort draws the same picture
    for n, key in enumerate(keys):
        ax = fig.add_subplot(nrow, ncol, n + 1)
        rows = groups[key]
        vals = np.array([r["value"] for r in rows], float)
        y = rng.uniform(-0.3, 0.3, len(vals))
        if len(vals) >= 5:
            ax.boxplot(vals, vert=False, positions=[0], widths=0.7, showfliers=False,
                       medianprops={"color": "#333"}, boxprops={"color": "#888"}, whiskerprops={"color": "#888"},
                       capprops={"color": "#888"})
        ax.scatter(vals, y, s=18, zorder=3, c=[_COLOURS.get(r["status"], "#757575") for r in rows],
                   edgecolors="none")
        limits = sorted({r["limit"] for r in rows if r["limit"] is not None})
        for lim in limits:
            ax.axvline(lim, color="#c62828", lw=1.4, ls="--")
        hi = max([float(vals.max())] + limits) * 1.08 or 1.0
        ax.set_xlim(min(0.0, float(vals.min())), hi)
        ax.set_ylim(-0.6, 0.6)
        ax.set_yticks([])
        n_over = sum(1 for r in rows if r["status"] == "fail")
        lim_txt = ("limit " + ", ".join(f"{v:g}" for v in limits) + f" {key[2] or ''}") if limits else "no limit"
        ax.set_title(f"{key[0]} {key[1]} ({lim_txt.strip()})\n{len(vals)} value{'' if len(vals) == 1 else 's'}, "
                     f"{n_over} over the limit", fontsize=8.5)
        ax.set_xlabel(f"cumulative {key[1]} ({key[2] or ''})", fontsize=8)
        ax.tick_params(labelsize=7.5)
    fig.tight_layout()
    return _png(fig)


def _counts_figure(counts: dict[str, dict[str, int]]) -> str | None:
    import numpy as np
    from matplotlib.figure import Figure
    if not counts:
        return None
    organs = list(counts)
    x = np.arange(len(organs))
    fig = Figure(figsize=(max(6.0, 0.55 * len(organs) + 2.0), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    w = 0.27
    for k, (key, label, col) in enumerate((("failing", "limit exceeded", "#c62828"),
                                           ("conditions_not_met", "conditions not met", "#6a1b9a"),
                                           ("incomplete", "incomplete", "#757575"))):
        ax.bar(x + (k - 1) * w, [counts[o][key] for o in organs], w, label=label, color=col)
    ax.set_xticks(x)
    ax.set_xticklabels(organs, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("cases")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _png(fig)


def _table(rows: list[list], header: list[str]) -> str:
    e = _e
    out = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{e(v)}</td>" for v in r) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _e(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


_CSS = ("body{font-family:'DejaVu Sans',Arial,sans-serif;font-size:10.5pt;margin:18px auto;max-width:1300px;"
        "color:#111}h1{font-size:16pt}h2{font-size:12.5pt;border-bottom:2px solid #333;margin-top:22px}"
        "table{border-collapse:collapse;font-size:9pt}td,th{border:1px solid #bbb;padding:2px 6px;text-align:left;"
        "vertical-align:top}th{background:#eee}img{max-width:100%}.failed{color:#c62828;font-weight:bold}"
        ".note{color:#444;font-size:9pt}")


def render_html(cohort, s_rows: list[dict], c_rows: list[dict]) -> str:
    from . import SOFTWARE_NAME, __version__
    n_failed = sum(1 for r in s_rows if r["state"] == "failed")
    n_resumed = sum(1 for r in s_rows if r["state"] == "resumed")
    counts = organ_counts(c_rows)
    dist = _distribution_figure(c_rows)
    bars = _counts_figure(counts)
    protos = sorted({f"{r['protocol_name']} (version {r['protocol_version']})" for r in s_rows
                     if r.get("protocol_name")})
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Cohort - {SOFTWARE_NAME}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>Cohort: {len(s_rows)} case(s)</h1>",
             f"<p>{len(s_rows) - n_failed} complete ({n_resumed} reused unchanged by --resume), "
             f"<span class='{'failed' if n_failed else ''}'>{n_failed} failed</span>. "
             f"Protocol(s): {_e(', '.join(protos) or '-')}. {SOFTWARE_NAME} {__version__}, written "
             f"{_dt.datetime.now().astimezone().isoformat(timespec='seconds')}.</p>",
             "<p class='note'>Every number here comes from the cases' results.json files; each case's report.html "
             "states its assumptions (alpha/beta, recovery credit, registration). Failed cases are not counted in "
             "the figures. This tool supports a decision; the treating clinician decides.</p>"]
    parts.append("<h2>Cumulative values against the limit, per organ and metric</h2>")
    if dist:
        parts.append(f"<figure><img alt='distribution of cumulative values' src='data:image/png;base64,{dist}'>"
                     "<figcaption class='note'>One dot per case and structure (EQD2 Gy for D metrics; cc or % for V "
                     "metrics); red dashed line: the protocol limit; dot colours: red over the limit, amber within "
                     "the warning tolerance, green met, purple conditions not met, grey other. Box (5 or more values): "
                     "quartiles and median.</figcaption></figure>")
    else:
        parts.append("<p>No cumulative value in any complete case.</p>")
    parts.append("<h2>Cases failing or incomplete, per organ</h2>")
    if bars:
        parts.append(f"<figure><img alt='failing cases per organ' src='data:image/png;base64,{bars}'></figure>")
        parts.append(_table([[o, d["cases"], d["failing"], d["conditions_not_met"], d["incomplete"]]
                             for o, d in counts.items()],
                            ["organ", "cases with this organ", "limit exceeded", "conditions not met",
                             "incomplete (not evaluated / no value)"]))
    else:
        parts.append("<p>No constraint row in any complete case.</p>")
    parts.append("<h2>Cases</h2>")
    parts.append(_table([[r["case"], r["patient_id"], r["state"], r["verdict_code"], r["verdict"], r["error"],
                          r["registration"], "" if r["run_seconds"] is None else f"{r['run_seconds']:.1f}"]
                         for r in s_rows],
                        ["case", "patient", "state", "verdict code", "verdict", "error", "registration QA",
                         "run time (s)"]))
    parts.append("</body></html>")
    return "".join(parts)
