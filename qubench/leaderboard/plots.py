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


def recovery_by_quantizer(frame: pd.DataFrame) -> alt.LayerChart | None:
    """Mean recovery per method, one bar per quantizer, with the seeds' bootstrap interval."""
    df = _kept(frame, "recovery")[["recovery", "recovery_low", "recovery_high", "method", "quantizer", "task",
                                   "source", "seeds"]]
    if df.empty:
        return None
    base = alt.Chart(df).encode(x=alt.X("method:N", title="method", axis=alt.Axis(labelAngle=0)),
                                xOffset=alt.XOffset("quantizer:N"))
    bars = base.mark_bar().encode(
        y=alt.Y("recovery:Q", title="recovery of the forget metric", axis=alt.Axis(format="%")),
        color=alt.Color("quantizer:N"),
        tooltip=TOOLTIP + [alt.Tooltip("recovery:Q", format=".0%"), alt.Tooltip("recovery_low:Q", format=".0%"),
                           alt.Tooltip("recovery_high:Q", format=".0%")])
    whiskers = base.mark_rule(color="black").encode(y="recovery_low:Q", y2="recovery_high:Q")
    return alt.layer(bars, whiskers).properties(
        title=alt.TitleParams("Recovery by quantizer for each method",
                              subtitle="bars: mean over seeds; lines: 95% bootstrap interval; 0% = the forgetting "
                                       "survives quantization, 100% = quantization undid it"), height=320)


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
