"""Per-request state has one home (issue 24): ``gateway.context.RequestContext``, made by the first hook and
passed explicitly from there on. Flask's ``g`` is where that one object waits between Flask's hooks and the
view, and only ``gateway/context.py`` may touch it: a module that reads ``g`` itself spreads per-request
state again (as ``g.created`` and ``g.saw_tools`` in the OpenAI renderer once did)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports_flask_g(path: Path) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "flask" and any(a.name == "g" for a in node.names):
            return True
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "flask" \
                and node.attr == "g":
            return True
    return False


def test_only_the_context_module_touches_flask_g():
    modules = sorted((ROOT / "gateway").glob("*.py")) + sorted((ROOT / "providers").glob("*.py"))
    assert len(modules) > 20
    touching = [p.relative_to(ROOT).as_posix() for p in modules if _imports_flask_g(p)]
    assert touching == ["gateway/context.py"], touching


def test_a_renderer_is_made_per_request_and_keeps_its_stream_state():
    from gateway.openai_compat import OpenAIRenderer

    first, second = OpenAIRenderer(), OpenAIRenderer()
    first.saw_tools = True
    assert second.saw_tools is False  # (a shared renderer would carry one stream's tools into another's end)
