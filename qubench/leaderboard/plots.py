"""The leaderboard's Altair charts, built from the table frame (table.to_frame).

Tooltips show file-derived text; Vega renders tooltips as text (escaped), never as HTML.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

TOOLTIP = ["method:N", "quantizer:N", "task:N", "source:N", "seeds:N"]


def _kept(frame: pd.DataFrame, *cols: str) -> pd.DataFrame:
    return frame.dropna(subset=list(cols)).reset_index(drop=True)


def forgetting_pre_post(frame: pd.DataFrame) -> alt.LayerChart | None:
    """Forget metric after vs before quantization; points above y = x regained memory."""
    df = _kept(frame, "forget_pre", "forget_post")[
        ["forget_pre", "forget_post", "method", "quantizer", "task", "source", "seeds", "forget_metric"]]
    if df.empty:
        return None
    lo = float(min(df.forget_pre.min(), df.forget_post.min()))
    hi = float(max(df.forget_pre.max(), df.forget_post.max()))
    pad = max((hi - lo) * 0.05, 0.5)
    diagonal = pd.DataFrame({"x": [lo - pad, hi + pad], "y": [lo - pad, hi + pad]})
    line = alt.Chart(diagonal).mark_line(strokeDash=[6, 4], color="gray").encode(
        x="x:Q", y="y:Q")
    points = alt.Chart(df).mark_point(size=80, filled=True, opacity=0.8).encode(
        x=alt.X("forget_pre:Q", title="forget metric before quantization (pre)", scale=alt.Scale(zero=False)),
        y=alt.Y("forget_post:Q", title="after quantization (post)", scale=alt.Scale(zero=False)),
        color=alt.Color("method:N"), shape=alt.Shape("quantizer:N"),
        tooltip=TOOLTIP + ["forget_metric:N", alt.Tooltip("forget_pre:Q", format=".2f"),
                           alt.Tooltip("forget_post:Q", format=".2f")])
    return alt.layer(line, points).properties(
        title=alt.TitleParams("Forgetting after vs before quantization",
                              subtitle="dashed: y = x; points above it regained memory when quantized"),
        height=380).interactive()


#: Recovery axes and colours span this range; values beyond it are drawn at its edge (their tooltips keep
#: the true value), so one collapsed 2-bit cell cannot flatten every other bar or colour.
RECOVERY_DOMAIN = (-1.0, 1.0)


def recovery_heatmap(frame: pd.DataFrame) -> alt.Chart | None:
    """Method x quantizer: the damage-controlled recovery, interval and verdict on hover. It answers
    "which methods survive which quantizers?" at a glance: white survives, red is undone."""
    df = _kept(frame, "controlled")[["controlled", "controlled_low", "controlled_high", "controlled_ci", "verdict",
                                     "method", "quantizer", "task", "source", "seeds", "control"]].copy()
    if df.empty:
        return None
    df["method"] = df.apply(lambda r: f"{r.method} (control)" if r.control else r.method, axis=1)
    df["label"] = df["controlled"].map(lambda v: f"{v:.0%}")
    base = alt.Chart(df).encode(
        x=alt.X("quantizer:N", title="quantizer", axis=alt.Axis(labelAngle=-30)),
        y=alt.Y("method:N", title="method"))
    cells = base.mark_rect().encode(
        color=alt.Color("controlled:Q", title="recovered",
                        scale=alt.Scale(scheme="redblue", reverse=True, domain=list(RECOVERY_DOMAIN), clamp=True),
                        legend=alt.Legend(format="%")),
        tooltip=TOOLTIP + [alt.Tooltip("controlled:Q", title="recovered (controlled)", format=".0%"),
                           alt.Tooltip("controlled_ci:N", title="95% interval"), "verdict:N"])
    text = base.mark_text(fontSize=11).encode(text="label:N")
    chart = alt.layer(cells, text).properties(height=alt.Step(26), width=alt.Step(70))
    if df["task"].nunique() > 1:
        chart = chart.facet(row=alt.Row("task:N", title=None))
    return chart.properties(title=alt.TitleParams(
        "How much of the forgetting quantization takes back (damage-controlled)",
        subtitle="0% = the forgetting survives, 100% = quantization undoes it; measured between the retrain model "
                 "and the target quantized the same way; colours clipped to [-100%, 100%]"))


def recovery_by_quantizer(frame: pd.DataFrame) -> alt.LayerChart | None:
    """Mean damage-controlled recovery per method, one bar per quantizer, with its 95% interval."""
    df = _kept(frame, "controlled")[["controlled", "controlled_low", "controlled_high", "recovery", "method",
                                     "quantizer", "task", "source", "seeds"]]
    if df.empty:
        return None
    scale = alt.Scale(domain=list(RECOVERY_DOMAIN), clamp=True)
    base = alt.Chart(df).encode(x=alt.X("method:N", title="method", axis=alt.Axis(labelAngle=0)),
                                xOffset=alt.XOffset("quantizer:N"))
    bars = base.mark_bar(clip=True).encode(
        y=alt.Y("controlled:Q", title="recovered (damage-controlled)", axis=alt.Axis(format="%"), scale=scale),
        color=alt.Color("quantizer:N"),
        tooltip=TOOLTIP + [alt.Tooltip("controlled:Q", format=".0%"), alt.Tooltip("controlled_low:Q", format=".0%"),
                           alt.Tooltip("controlled_high:Q", format=".0%"),
                           alt.Tooltip("recovery:Q", title="paper's recovery", format=".0%")])
    whiskers = base.mark_rule(color="black", clip=True).encode(y=alt.Y("controlled_low:Q", scale=scale),
                                                               y2="controlled_high:Q")
    return alt.layer(bars, whiskers).properties(
        title=alt.TitleParams("Recovery by quantizer for each method",
                              subtitle="bars: mean over seeds; lines: 95% interval; axis clipped to [-100%, 100%] "
                                       "(tooltips give the true values)"), height=320)


def utility_vs_forgetting(frame: pd.DataFrame) -> alt.FacetChart | None:
    """Utility against forgetting for every row, before and after quantization side by side."""
    parts = []
    for stage in ("pre", "post"):
        part = _kept(frame, f"forget_{stage}", f"utility_{stage}")[
            [f"forget_{stage}", f"utility_{stage}", "method", "quantizer", "task", "source", "seeds"]]
        part = part.rename(columns={f"forget_{stage}": "forget", f"utility_{stage}": "utility"})
        part["stage"] = "before quantization" if stage == "pre" else "after quantization"
        parts.append(part)
    df = pd.concat(parts, ignore_index=True)
    if df.empty:
        return None
    return alt.Chart(df).mark_point(size=70, filled=True, opacity=0.8).encode(
        x=alt.X("forget:Q", title="forget metric (lower = more forgotten)", scale=alt.Scale(zero=False)),
        y=alt.Y("utility:Q", title="utility (higher = better)", scale=alt.Scale(zero=False)),
        color="method:N", shape="quantizer:N",
        tooltip=TOOLTIP + ["stage:N", alt.Tooltip("forget:Q", format=".2f"), alt.Tooltip("utility:Q", format=".2f")],
    ).properties(height=300, width=330).facet(
        column=alt.Column("stage:N", sort=["before quantization", "after quantization"],
                          title="utility vs forgetting"))
