"""Guards on the project's shape that bit the user before."""
from __future__ import annotations

from pathlib import Path

import providers

ROOT = Path(__file__).resolve().parent.parent
SDKS = {"openai", "zhipuai", "dashscope", "ray", "flask", "gunicorn", "httpx", "tenacity",
        "prometheus_client", "pydantic", "aiohttp", "vllm", "transformers", "torch"}


def test_no_module_shadows_an_sdk():
    def ours(path: Path) -> bool:  # not in a hidden folder (.venv, bench/.peer-venv, .git)
        return not any(part.startswith(".") for part in path.relative_to(ROOT).parts)

    modules = [p for p in ROOT.rglob("*.py") if ours(p)]
    assert modules
    shadowing = [str(p.relative_to(ROOT)) for p in modules if p.stem in SDKS]
    shadowing += [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_dir() and p.name in SDKS and ours(p)]
    assert not shadowing, f"these names shadow installed packages: {shadowing}"


def test_every_provider_has_routes_and_a_spec(app):
    rules = {r.rule for r in app.url_map.iter_rules()}
    for name in providers.names():
        provider = providers.get(name)
        assert provider.spec_class.MODEL_TYPES, name
        for action in ("deploy", "chat", "undeploy"):
            assert f"/{name}/{action}" in rules
    assert "openai" in providers.names()


def test_a_replica_loads_only_its_own_providers_sdk():
    """Each endpoint is a process: what its replica imports is memory per endpoint (docs/numbers.md)."""
    import subprocess
    import sys

    probe = ("import sys, gateway.replica, providers.openai_provider; "
             "print(' '.join(m for m in ('zhipuai', 'dashscope', 'flask', 'transformers', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"an OpenAI replica imports {out.stdout.strip()}"


def _imports(package: str) -> dict[str, set[str]]:
    """The top-level packages each module of ``package`` imports (every import statement, in functions too)."""
    import ast

    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_providers_import_no_gateway_module_and_the_shared_package_imports_neither():
    """``providers`` is written against ``contract`` (errors, events, the call and its result) and its SDKs;
    ``contract`` imports neither side, so neither can pull the other in through it."""
    wrong = {mod: sorted(names & {"gateway"}) for mod, names in _imports("providers").items() if "gateway" in names}
    wrong |= {mod: sorted(names & {"gateway", "providers"}) for mod, names in _imports("contract").items()
              if names & {"gateway", "providers"}}
    assert not wrong, wrong
    assert _imports("providers") and _imports("contract")
