"""The leaderboard's data side: read result files (never plugin code), aggregate seeds, rank, plot.

The Streamlit page is `leaderboard/app.py` in the repository; `qubench leaderboard` starts it.
"""
