"""The package's layout: subpackages by concern, imports that run one way, lazy public names,
and a memory ledger that imports where torch is not installed (a browser)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lora_edu

PACKAGE = Path(lora_edu.__file__).parent

# which subpackages each one may import from: the layering lora_edu/__init__.py describes
LAYERS = {
    "methods": set(),
    "train": set(),
    "data": set(),
    "quant": {"methods"},
    "tiny": {"train"},
    "memory": {"methods", "quant", "train", "tiny"},
    "experiments": {"methods", "quant", "tiny", "train"},
    "teaching": {"methods"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """lora_edu modules that `path` imports anywhere (module level or inside a function)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lora_edu")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("lora_edu"):
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for target in _imports(path):
            while target not in modules and "." in target:  # "from .x import y" where y is a name
                target = target.rpartition(".")[0]
            if target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_of_the_modules_is_acyclic():
    graph = _graph()
    assert "lora_edu.memory.ledger" in graph and "lora_edu.methods.lora" in graph
    # __init__ files only name their modules lazily, as strings, so they take no part in the graph
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_find_cycle_finds_one():  # the check above can fail
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_subpackages_import_only_the_layers_below_them():
    assert set(LAYERS) == {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert set(LAYERS) == set(lora_edu.SUBPACKAGES)
    for module, deps in _graph().items():
        here = _subpackage(module)
        for dep in deps:
            there = _subpackage(dep)
            if here and there and here != there:
                assert there in LAYERS[here], f"{module} imports {dep}: {here} may only use {sorted(LAYERS[here])}"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_each_subpackage_says_what_it_holds_and_its_names_resolve(name):
    package = getattr(lora_edu, name)
    assert package.__doc__ and len(package.__doc__.split()) >= 10, f"lora_edu.{name} needs a docstring"
    for public in getattr(package, "__all__", ()):
        obj = getattr(package, public)
        if public in lora_edu.__all__:  # the same object at the top level
            assert getattr(lora_edu, public) is obj


def test_top_level_names_are_the_subpackages_names():
    listed = [name for sub in lora_edu.SUBPACKAGES for name in getattr(getattr(lora_edu, sub), "NAMES", {})]
    assert len(listed) == len(set(listed)), "a name is defined in two subpackages"
    # every subpackage name is public at the top, except one that would hide a subpackage (tiny.train)
    assert set(lora_edu.__all__) == set(listed) - set(lora_edu.SUBPACKAGES) and "train" in listed
    assert lora_edu.train.__name__ == "lora_edu.train" and callable(lora_edu.tiny.train)


def test_top_level_names_resolve_to_their_subpackage_objects():
    assert len(lora_edu.__all__) > 50
    for name in lora_edu.__all__:
        obj = getattr(lora_edu, name)
        if hasattr(obj, "__module__") and not isinstance(obj, (dict, tuple, int, float, str)):
            assert obj.__module__.startswith("lora_edu."), (name, obj.__module__)
    assert lora_edu.LoRALinear is lora_edu.methods.lora.LoRALinear
    assert lora_edu.estimate_memory is lora_edu.memory.ledger.estimate_memory


def test_an_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'LoraLinear'"):
        lora_edu.LoraLinear  # noqa: B018
    with pytest.raises(AttributeError, match="lora_edu.memory"):
        lora_edu.memory.measure_steps  # noqa: B018


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=PACKAGE.parent)


def test_import_lora_edu_loads_no_torch_and_lists_its_names_before_their_first_use():
    out = _fresh("""
        import sys
        import lora_edu
        listed = set(lora_edu.__all__) | set(lora_edu.SUBPACKAGES) <= set(dir(lora_edu))
        subs = [getattr(lora_edu, sub) for sub in lora_edu.SUBPACKAGES if sub != "data"]
        print("torch" in sys.modules, listed, all(set(sub.__all__) <= set(dir(sub)) for sub in subs))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True"]


def test_the_memory_ledger_runs_without_torch_or_numpy():
    out = _fresh("""
        import sys
        sys.modules["torch"] = None  # import torch now raises ImportError, as where it is not installed
        sys.modules["numpy"] = None
        import lora_edu
        from lora_edu.memory import ledger, peak, spec, activations
        seven_b = lora_edu.get_preset("llama-7b")
        full = lora_edu.estimate_memory(seven_b, "full")
        qlora = lora_edu.estimate_memory(lora_edu.get_preset("llama-65b"), "qlora", r=64, targets="all-linear")
        top = lora_edu.estimate_peak(seven_b, "lora", batch=1, seq_len=512)
        assert lora_edu.lora_params_for(seven_b, ("q", "k", "v", "o"), 8) == 8_388_608
        assert lora_edu.bits_per_param(64, double_quant=True) == 4 + 8 / 64 + 32 / (64 * 256)
        try:
            lora_edu.ModelSpec(4096, 32, 30, 11008, 32000)
        except ValueError as e:
            assert "divisible" in str(e)
        else:
            raise AssertionError("a bad spec was accepted")
        try:
            lora_edu.LoRALinear
        except ImportError:
            pass
        else:
            raise AssertionError("LoRALinear imported without torch?")
        print(repr(full.total), repr(qlora.total), repr(top.total))
    """)
    assert out.returncode == 0, out.stderr
    full, qlora, top = (float(x) for x in out.stdout.split())
    seven_b = lora_edu.get_preset("llama-7b")
    assert full == 16 * lora_edu.count_params(seven_b)  # 16 B per parameter, as in chapter 4
    # the same numbers as in this interpreter, where torch is there
    assert qlora == lora_edu.estimate_memory(lora_edu.get_preset("llama-65b"), "qlora", r=64,
                                             targets="all-linear").total
    assert top == lora_edu.estimate_peak(seven_b, "lora", batch=1, seq_len=512).total
