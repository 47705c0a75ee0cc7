"""Third-party submissions: `qubench submit` runs the standard grid for a plugin method and writes
`submissions/<name>/`; `qubench validate` checks such a folder; `qubench verify` re-runs some of
its cells and records whether the numbers hold."""
