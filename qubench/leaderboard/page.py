"""The Streamlit page: overview (table, filters, plots, rejected files) and one detail page per result.

Everything read from result files is untrusted: it is shown only through st.dataframe, st.json,
st.code and st.text (or as widget options), never through Markdown or HTML. Markdown is used for
this module's own text only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import streamlit as st

from qubench.leaderboard import detail, plots, ranking, table
from qubench.leaderboard.data import Board, Run, load_board, signature
from qubench.leaderboard.rows import build_rows

RESULT_PARAM = "result"


@st.cache_data(show_spinner="reading result files ...", max_entries=4)
def _load(results: tuple[str, ...], submissions: str | None, verifications: str | None,
          files_signature: str) -> tuple[Board, pd.DataFrame]:
    # files_signature is only part of the cache key: it changes when any file under the sources changes.
    board = load_board([Path(r) for r in results], Path(submissions) if submissions else None,
                       Path(verifications) if verifications else None)
    frame = table.to_frame(ranking.rank(build_rows(board)))
    return board, frame


def main(results: list[Path], submissions: Path | None, verifications: Path | None = None) -> None:
    st.set_page_config(page_title="qubench leaderboard", layout="wide")
    res = tuple(str(r) for r in results)
    sub = str(submissions) if submissions else None
    ver = str(verifications) if verifications else None
    board, frame = _load(res, sub, ver, signature([Path(r) for r in res], Path(sub) if sub else None,
                                                  Path(ver) if ver else None))
    key = st.query_params.get(RESULT_PARAM)
    if key:
        run = board.run(key)
        if run is not None:
            detail_page(board, run)
            return
        st.warning("There is no result at this address any more; showing the leaderboard.")
    overview(board, frame)


# --- overview ---------------------------------------------------------------------------------------

def _options(frame: pd.DataFrame, column: str) -> list:
    return sorted({v for v in frame[column].dropna().tolist()}, key=str)


def _filter(frame: pd.DataFrame) -> pd.DataFrame:
    sb = st.sidebar
    sb.header("Filters")
    tasks = sb.multiselect("task", _options(frame, "task"), key="filter_task", placeholder="all tasks")
    families = sb.multiselect("quantizer family", _options(frame, "family"), key="filter_family",
                              placeholder="all families")
    bits = sb.multiselect("bit width", _options(frame, "bits"), key="filter_bits", placeholder="all bit widths",
                          format_func=lambda b: f"{b:g}")
    engines = sb.multiselect("engine", _options(frame, "engine"), key="filter_engine", placeholder="all engines")
    methods = sb.multiselect("methods", _options(frame[~frame.standing.str.startswith("baseline")], "method"),
                             key="filter_methods", placeholder="all methods")
    verified = sb.checkbox("verified only", key="filter_verified",
                           help="Keep the project's reference results and rows whose every cell the maintainers "
                                "re-ran with `qubench verify` and found matching.")
    sb.caption("An empty filter keeps everything. Target and retrain baselines stay visible whatever the "
               "method filter.")
    keep = pd.Series(True, index=frame.index)
    for column, chosen in (("task", tasks), ("family", families), ("bits", bits), ("engine", engines)):
        if chosen:
            keep &= frame[column].isin(chosen)
    if methods:
        keep &= frame["method"].isin(methods) | frame["standing"].str.startswith("baseline")
    if verified:
        keep &= frame["verified_flag"]
    return frame[keep]


def _column_config() -> dict:
    cc = st.column_config
    config = {}
    for c in table.COLUMNS:
        if c.kind == "number":
            config[c.id] = cc.NumberColumn(c.label, help=c.help, format="%.2f")
        elif c.kind == "int":
            config[c.id] = cc.NumberColumn(c.label, help=c.help, format="%d")
        elif c.kind == "percent":
            config[c.id] = cc.NumberColumn(c.label, help=c.help, format="percent")
        elif c.kind == "date":
            config[c.id] = cc.DatetimeColumn(c.label, help=c.help, format="YYYY-MM-DD")
        else:
            config[c.id] = cc.TextColumn(c.label, help=c.help)
    return config


def overview(board: Board, frame: pd.DataFrame) -> None:
    st.title("qubench leaderboard")
    st.markdown("**Does LLM unlearning survive quantization?** Each row is one unlearning method on one task, "
                "quantized one way, averaged over seeds: how much of the forget set the model still knows "
                "before (*pre*) and after (*post*) quantization, and how much utility it keeps.")
    st.info("**How rows are ranked.** " + ranking.RULE)
    shown = _filter(frame)
    methods, audits = shown[~shown["audited_flag"]], shown[shown["audited_flag"]]
    st.subheader(f"Results ({len(methods)} of {len(frame) - int(frame['audited_flag'].sum())} rows)")
    st.dataframe(methods, column_config=_column_config(), column_order=[c.id for c in table.COLUMNS],
                 hide_index=True, key="table")
    if len(audits):
        st.subheader(f"Audited checkpoints ({len(audits)} rows)")
        st.caption("Models unlearned elsewhere and measured with `qubench audit` (method external:NAME): the "
                   "same measurements, listed apart and not ranked, since no plugin method produced them.")
        st.dataframe(audits, column_config=_column_config(), column_order=[c.id for c in table.COLUMNS],
                     hide_index=True, key="audits")
    st.download_button("Download the table as CSV", data=table.to_csv(shown), file_name="qubench-leaderboard.csv",
                       mime="text/csv", key="csv")

    st.subheader("Plots")
    charts = [plots.recovery_heatmap(shown), plots.forgetting_pre_post(shown), plots.recovery_by_quantizer(shown),
              plots.utility_vs_forgetting(shown)]
    undefined = "no row has a defined damage-controlled recovery (see each result's notes)"
    empty = [undefined, "no row has both pre and post forgetting", undefined, "no row has both forgetting and utility"]
    for chart, why in zip(charts, empty):
        if chart is None:
            st.caption(f"(plot left out: {why})")
        else:
            st.altair_chart(chart)

    _detail_picker(board, shown)
    _sources(board)
    _rejected(board)


def _detail_picker(board: Board, shown: pd.DataFrame) -> None:
    st.subheader("Result details")
    keys = [k for runs in shown["runs"] for k in runs]
    if not keys:
        st.caption("No result in the filtered table.")
        return
    titles = {run.key: detail.title(run) for run in board.runs if run.key in set(keys)}
    choice = st.selectbox("result", keys, format_func=lambda k: titles.get(k, k), key="detail_choice")
    if st.button("Open its detail page", key="open_detail"):
        st.query_params[RESULT_PARAM] = choice
        st.rerun()


def _sources(board: Board) -> None:
    st.subheader("Sources")
    st.caption("A submission's cell is *verified* when the maintainers re-ran it with `qubench verify` (record in "
               "leaderboard/verifications/, never in the submitter's folder) and its numbers match the re-run's; "
               "every other cell is *submitted*. The 'why' column says how many cells are verified and how likely "
               "the draw was to catch one tampered cell.")
    records = [{"source": s.name, "kind": s.kind, "badge": s.badge, "why": s.note, "package": s.package,
                "version": s.version, "folder": s.folder} for s in board.sources]
    st.dataframe(pd.DataFrame.from_records(records, columns=["source", "kind", "badge", "why", "package", "version",
                                                             "folder"]), hide_index=True, key="sources")
    for s in board.sources:
        if s.kind == "reference":
            st.caption("The reference results were produced by this command, with these qubench versions "
                       "(from leaderboard/reference/MANIFEST.yaml):")
            st.code(str(s.details.get("command", "(no command recorded)")), language="bash")
            produced = s.details.get("produced_by")
            if isinstance(produced, list):
                st.dataframe(pd.DataFrame([p for p in produced if isinstance(p, dict)]), hide_index=True)


def _rejected(board: Board) -> None:
    st.subheader(f"Rejected files ({len(board.rejected)})")
    if board.rejected:
        st.caption("These files are not shown: each failed a check, for the reason given.")
        st.dataframe(pd.DataFrame([r.model_dump() for r in board.rejected]), hide_index=True, key="rejected")
    else:
        st.caption("None: every file read is a valid qubench result.")
    if board.failed:
        st.subheader(f"Failed runs ({len(board.failed)})")
        st.dataframe(pd.DataFrame([{"result": r.key, "stage": r.result.error.stage if r.result.error else None,
                                    "error": f"{r.result.error.type}: {r.result.error.message}"
                                    if r.result.error else None} for r in board.failed]),
                     hide_index=True, key="failed")


# --- detail page --------------------------------------------------------------------------------------

def detail_page(board: Board, run: Run) -> None:
    if st.button("← back to the leaderboard", key="back"):
        del st.query_params[RESULT_PARAM]
        st.rerun()
    result = run.result
    source = board.source(run.source)
    st.title("Result")
    st.text(detail.title(run))
    st.caption("Source and verification")
    st.dataframe(pd.DataFrame([{"source": run.source, "badge": run.badge, "why": run.badge_note,
                                "source badge": source.badge if source else None, "file": run.path, "sha256": run.sha256,
                                "status": result.status, "created": str(result.created)}]), hide_index=True)
    if result.error is not None:
        st.error("This run failed.")
        st.code(f"{result.error.stage}: {result.error.type}: {result.error.message}\n\n{result.error.traceback}",
                language=None)

    if result.separation is not None:
        st.subheader("Can this run show forgetting?")
        st.caption("Only if its target remembers the forget set measurably more than the retrain model (or, "
                   "without one, than never-trained text): the separation check.")
        st.text(f"{result.separation.status}: {result.separation.message}")  # file text: never Markdown

    st.subheader("Metrics")
    st.caption("pre/post: the unlearned model before/after quantization; target_pre/target_post: the target "
               "before/after; retrain/retrain_post: the model never trained on the forget set, before/after; "
               "gap = post - pre; target_change = target_post - target_pre; recovery = gap / (target_pre - pre) "
               "(the papers' figure); position = where a model sits between retrain (0) and target (1) at the "
               "same precision; controlled_recovery = (position_post - position_pre) / (1 - position_pre). "
               "Recoveries are for forget metrics only (utility metrics have nothing to recover: their change is gap).")
    st.dataframe(pd.DataFrame(detail.metrics_rows(result)), hide_index=True, key="metrics")

    st.subheader("Diagnostics: weight deltas vs the quantization step")
    st.caption("When unlearning moves weights by much less than one quantization step, rounding can map the "
               "unlearned model back onto the quantized target: the share of differing quantized weights tells "
               "how much of the update survives.")
    st.dataframe(pd.DataFrame(detail.diagnostics_rows(result)), hide_index=True, key="diagnostics",
                 column_config={"value": st.column_config.NumberColumn(format="%.3e")})
    if result.diagnostics.extra:
        st.json(result.diagnostics.extra, expanded=False)

    st.subheader("Reproduce")
    st.code(detail.reproduce_command(result, source), language="bash")

    st.subheader("Full spec")
    st.json(result.spec.model_dump(mode="json"))
    st.subheader("Resolved parameters, quantization scheme, models")
    st.json(result.resolved, expanded=False)
    st.subheader("Environment")
    st.json(result.environment, expanded=False)
    st.subheader("Unlearning, timings, data hashes")
    st.json({"unlearning": result.unlearning, "timings": result.timings, "data_hashes": result.data_hashes},
            expanded=False)
    st.download_button("Download the raw JSON", data=run.text.encode("utf-8"),
                       file_name=re.sub(r"[^A-Za-z0-9._-]", "_", Path(run.path).name) or "result.json",
                       mime="application/json", key="raw_json")
