"""The plugin registry: built-ins found through entry points, suggestions, broken third-party plugins."""

from __future__ import annotations

import sys
import textwrap
import warnings

import pytest
from click.testing import CliRunner

from qubench import registry
from qubench.cli import main
from qubench.errors import ConfigError, PluginLoadError


def test_builtins_are_registered_through_entry_points():
    assert {"ga", "ga_gdr", "ga_klr", "npo", "npo_gdr", "npo_klr", "target", "retrain"} <= set(registry.names("methods"))
    assert {"rtn-4bit", "rtn-8bit"} <= set(registry.names("quantizers"))
    assert "synth-news" in registry.names("tasks")
    assert "hf" in registry.names("engines")


def test_unknown_name_suggests_nearest_and_lists_all():
    with pytest.raises(ConfigError) as err:
        registry.get("methods", "npo_kl")
    msg = str(err.value)
    assert "unknown method 'npo_kl'" in msg
    assert "Did you mean 'npo_klr'" in msg
    assert "Available methods: ga, ga_gdr" in msg


def test_unknown_family_is_an_error():
    with pytest.raises(ConfigError, match="unknown plugin family 'metods'"):
        registry.names("metods")


def test_unknown_parameter_lists_allowed_ones():
    with pytest.raises(ConfigError) as err:
        registry.create("methods", "ga_gdr", {"learning_rate": 1e-4})
    assert "learning_rate" in str(err.value)
    assert "allowed parameters:" in str(err.value) and "lr (default" in str(err.value)


def _fake_distributions(folder, group: str, version: str, entries: dict[str, str]) -> None:
    """Installed-looking distributions (a .dist-info with METADATA and entry_points.txt each) in `folder`."""
    for dist, entry in entries.items():
        info = folder / f"{dist}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[{group}]\n{entry}\n")


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """Install two fake third-party distributions on sys.path: one broken, one working."""
    good = tmp_path / "goodplug.py"
    good.write_text(textwrap.dedent('''
        from qubench.methods.reference import Target
        class Noop(Target):
            name = "noop"
            description = "A third-party method that changes nothing."
    '''))
    _fake_distributions(tmp_path, "qubench.methods", "1.2.3", {
        "brokenplug": "broken = brokenplug_missing_module:Method", "goodplug": "noop = goodplug:Noop"})
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("goodplug", None)


def test_broken_plugin_is_reported_and_the_rest_keep_working(third_party):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infos = {i.name: i for i in registry.describe("methods")}
    assert infos["broken"].error is not None and "brokenplug 1.2.3" in infos["broken"].error
    assert any("brokenplug" in str(w.message) for w in caught)
    assert infos["noop"].package == "goodplug" and infos["noop"].error is None
    assert infos["ga_gdr"].package == "qubench"
    with pytest.raises(PluginLoadError, match="from package brokenplug 1.2.3 failed to import"):
        registry.get("methods", "broken")
    assert registry.get("methods", "noop").name == "noop"


def test_source_names_the_package_that_registers_a_plugin(third_party):
    from importlib.metadata import version

    from qubench.env import plugin_sources
    from qubench.specs import PluginRef, RunSpec

    assert registry.source("methods", "noop") == "goodplug 1.2.3"
    assert registry.source("methods", "npo_klr+hinge") == f"qubench {version('qubench')}"  # its base's package
    assert registry.source("methods", "nonexistent") is None
    sources = plugin_sources(RunSpec(method=PluginRef(name="noop"), quant=PluginRef(name="gptq-4bit")))
    assert sources == {"task": f"qubench {version('qubench')}", "method": "goodplug 1.2.3",
                       "quant": f"qubench {version('qubench')}", "engine": f"qubench {version('qubench')}"}


def test_cli_list_survives_broken_plugin(third_party):
    res = CliRunner().invoke(main, ["list", "methods", "--json"])
    assert res.exit_code == 0, res.output
    assert '"noop"' in res.stdout and '"broken"' in res.stdout


def test_cli_run_unknown_quantizer_fails_fast_with_suggestion(tmp_path, monkeypatch):
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path / "home"))
    res = CliRunner().invoke(main, ["run", "--quant", "rtn-4bits", "--results", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert "Did you mean 'rtn-4bit'" in res.output
    assert not (tmp_path / "home" / "models").exists()  # failed before any work


def test_cli_list_methods_explains_composition():
    res = CliRunner().invoke(main, ["list", "methods"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "quail" in text and "BASE+MOD[+MOD]" in text and "hinge (QUAIL" in text


def test_cli_list_prints_plugin_text_verbatim():
    res = CliRunner().invoke(main, ["list", "quantizers"])
    assert res.exit_code == 0
    assert "[gptqmodel]" in " ".join(res.output.split())  # not swallowed as rich markup


def test_cli_errors_print_brackets_verbatim(tmp_path, monkeypatch):
    monkeypatch.setenv("QUBENCH_HOME", str(tmp_path))
    res = CliRunner().invoke(main, ["run", "--method", "ga[bold]", "--results", str(tmp_path / "r")])
    assert res.exit_code == 2 and "'ga[bold]'" in res.output  # rich markup must not eat the name


def test_a_third_party_family_resolver_builds_names_on_demand(tmp_path, monkeypatch):
    """Composite names are the family's business, found through the `qubench.resolvers` entry point group
    the built-in method compositions use too; a broken resolver is a warning, never an outage."""
    (tmp_path / "quantresolver.py").write_text(textwrap.dedent('''
        from qubench.quantizers.rtn import RTN4bit
        def resolve(name):
            if not name.startswith("rtn4-g"):
                return None
            return type(name, (RTN4bit,), {"name": name, "provided_by": "rtn-4bit"})
    '''))
    _fake_distributions(tmp_path, registry.RESOLVER_GROUP, "0.1", {
        "quantresolver": "quantizers = quantresolver:resolve", "badresolver": "quantizers = badresolver_missing:resolve"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert registry.get("quantizers", "rtn4-g64").name == "rtn4-g64"
        assert registry.source("quantizers", "rtn4-g64") == registry.source("quantizers", "rtn-4bit")
        with pytest.raises(ConfigError, match="unknown quantizer 'rtn5-bit'"):
            registry.get("quantizers", "rtn5-bit")
    assert any("badresolver" in str(w.message) for w in caught)
    assert registry.get("methods", "npo_klr+hinge").provided_by == "npo_klr"


def test_the_registry_imports_no_plugin_family_and_the_package_has_no_import_cycle():
    import ast
    import subprocess
    from pathlib import Path

    code = "import sys, qubench.registry; print(sorted(m for m in sys.modules if m.startswith('qubench.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parent).stdout
    assert "qubench.methods" not in loaded and "qubench.quantizers" not in loaded

    root = Path(registry.__file__).parent
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in root.rglob("*.py") if "lm_eval_tasks" not in p.parts}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level: what importing the module runs
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps

    def cycle_from(start, node, seen):
        for dep in graph[node]:
            if dep == start:
                return [node, dep]
            if dep not in seen:
                seen.add(dep)
                if found := cycle_from(start, dep, seen):
                    return [node, *found]
        return None

    cycles = [c for m in graph if (c := cycle_from(m, m, set()))]
    assert cycles == []
