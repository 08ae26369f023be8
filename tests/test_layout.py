"""Tier 1: the house. The paper and its loop at the root, the machinery in lib/, arrows only downwards.

Read from the source (ast), function-level imports included, so a lazy import cannot hide an arrow.
"""

import ast
import glob
import os

from tests.helpers import ROOT

MAX_ROOT_MODULES = 11  # gate loss hapo update rollout reward train eval launch, test_hapo, conftest


def _modules():
    """{module name as imported ('hapo', 'lib.data'): path} for the root's and lib/'s modules."""
    found = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, "*.py"))}
    found.update({f"lib.{os.path.basename(p)[:-3]}": p for p in glob.glob(os.path.join(ROOT, "lib", "*.py"))
                  if not p.endswith("__init__.py")})
    return found


def _imports(path, known):
    """The house's modules that the file at path imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # from lib import data
    return out & set(known)


def test_root_holds_the_paper_and_lib_the_machinery():
    root = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")))
    assert len(root) <= MAX_ROOT_MODULES, root
    assert {"gate.py", "loss.py", "hapo.py", "rollout.py", "reward.py", "train.py", "eval.py"} <= set(root)
    for machinery in ("data", "task", "tiny", "models", "checkpoint", "parallel", "plan", "tracking", "vllm_engine",
                      "weight_sync", "latex", "symbolic"):
        assert os.path.exists(os.path.join(ROOT, "lib", f"{machinery}.py")), machinery


def test_lib_never_imports_the_root():
    known = _modules()
    for name, path in known.items():
        if name.startswith("lib."):
            up = {m for m in _imports(path, known) if not m.startswith("lib.")}
            assert not up, f"{name} imports {sorted(up)} from the root"


def test_the_house_has_no_import_cycle():
    known = _modules()
    graph = {name: _imports(path, known) - {name} for name, path in known.items()}
    state = {}  # name -> 1 on the stack, 2 done

    def visit(name, stack):
        state[name] = 1
        for nxt in sorted(graph[name]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(stack + [name, nxt])
            if nxt not in state:
                visit(nxt, stack + [name])
        state[name] = 2
    for name in sorted(graph):
        if name not in state:
            visit(name, [])
