"""Run in a fresh interpreter by `qubench validate`: does the submitted method load, from which
package, and does it accept the submitted parameters? Prints one JSON line.

    python -m qubench.submissions.probe METHOD PARAMS_JSON
"""

from __future__ import annotations

import json
import sys


def probe(name: str, params: dict) -> dict:
    from importlib.metadata import entry_points

    from qubench import registry

    found = [ep for ep in entry_points(group=registry.FAMILIES["methods"]) if ep.name == name]
    out: dict = {"found": bool(found), "loaded": False}
    if found:
        ep = found[0]
        dist = getattr(ep, "dist", None)
        out.update(entry_point=ep.value, package=dist.metadata["Name"] if dist else None,
                   version=dist.version if dist else None)
    try:
        registry.create("methods", name, params)
        out["loaded"] = True
    except Exception as exc:  # anything the plugin raises is a finding, not a crash
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], json.loads(sys.argv[2]))))
