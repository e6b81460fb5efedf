"""The house as drawn: the README's layer order holds for every import (module level and inside functions),
imports of the library's rooms sit at the top of modules (the command line excepted, for a torch-free start),
and a new execution engine is one module plus a registry entry."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import ovlabel
from test_pipeline import BASE, scenes
from test_runs import assert_same_outputs

ROOT = Path(ovlabel.__file__).parent
README = Path(__file__).resolve().parents[1] / "README.md"


def layer_order() -> list[str]:
    """The rooms in the README's "Layers, lowest first" line."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"Layers, lowest first.*?:\n(.+?)\.\n", text, flags=re.S)
    assert m, "README.md has no 'Layers, lowest first' line"
    return re.findall(r"`([\w_]+)`", m.group(1))


def room_of(module: str) -> str:
    """The room of a module (or of a name imported from the package itself: ``__init__``)."""
    parts = module.split(".")
    room = parts[1] if len(parts) > 1 else "__init__"
    return room if (ROOT / room).is_dir() or (ROOT / f"{room}.py").is_file() else "__init__"


def imports() -> list[tuple[str, str, int, bool]]:
    """``(module, imported module, line, inside a function)`` for every import of ovlabel's own modules."""
    out = []
    for path in ROOT.rglob("*.py"):
        mod = ".".join(("ovlabel", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = pkg
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                name = f"{base}.{node.module}" if node.level and node.module else (node.module if not node.level
                                                                                    else base)
                # `from pkg import sub` names the sub-module too, where there is one
                names = [name, *(f"{name}.{a.name}" for a in node.names)] if name else []
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            out += [(mod, n, node.lineno, id(node) in inner) for n in names if n and n.startswith("ovlabel")]
    return out


def test_every_import_follows_the_readmes_layer_order():
    order = layer_order()
    rooms = {room_of(".".join(("ovlabel", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__"))
             for p in ROOT.rglob("*.py")}
    assert sorted(order) == sorted(rooms), f"the README's layers {order} are not the package's rooms {sorted(rooms)}"
    rank = {r: i for i, r in enumerate(order)}
    upward = [(mod, target, line) for mod, target, line, _ in imports()
              if rank[room_of(target)] > rank[room_of(mod)]]
    assert not upward, "imports that run up the README's layer order: " + "; ".join(
        f"{m}:{line} imports {t}" for m, t, line in upward)


def test_library_imports_sit_at_the_top_of_modules():
    """Inside a function, only the command line imports the library (its commands start without torch)."""
    inner = [(mod, target, line) for mod, target, line, inside in imports() if inside and mod != "ovlabel.cli"]
    assert not inner, inner


def test_module_graph_has_no_cycles_and_flows_downstream():
    """Module by module (finer than the rooms): no import cycle, and the explainers' registry never reaches
    the public entry point. Package ``__init__`` files only re-export, so they do not close cycles."""
    modules = {".".join(("ovlabel", *p.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
               for p in ROOT.rglob("*.py")}
    packages = {".".join(("ovlabel", *p.parent.relative_to(ROOT).parts)) for p in ROOT.rglob("__init__.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, target, _, _ in imports():
        if target in modules and target != mod:
            graph[mod].add(target)
    assert "ovlabel.legrad.explain" not in graph["ovlabel.legrad.methods"]
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m] - packages:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack, m, d]))
            if d not in state:
                visit(d, [*stack, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


# ------------------------------------------------------------------------------------- a third engine
class ReverseEngine:
    """A toy third engine, as a user would write one (one module's worth): decode each batch of the plan
    with ovlabel's decoder, last batch first, label it with ``Pipeline.label_batch`` and append the records
    through the shared sink. It never imports the runner."""

    @staticmethod
    def execute(pipe, plan, options=None, config=None) -> dict:
        from ovlabel.common.files import fsync_dir
        from ovlabel.pipeline.engines.sink import RecordSink
        from ovlabel.pipeline.images import decode_item

        with RecordSink(plan, progress=False) as sink:
            for batch in reversed(plan.todo):
                decoded = [decode_item(it, pipe.cfg.run.max_pixels, pipe.cfg.run.max_aspect_ratio) for it in batch]
                records = pipe.label_batch(decoded, plan.out_dir, categories=plan.queries.categories)
                for sub in pipe.output_dirs(plan.out_dir):
                    fsync_dir(sub)
                sink.append(records)
        sink.counts.add_stats(pipe.stats)
        return sink.counts.as_dict()


def test_a_registered_third_engine_gives_byte_identical_files(tmp_path, monkeypatch):
    from ovlabel.cli import main
    from ovlabel.pipeline import engines

    monkeypatch.setitem(engines.ENGINES, "reverse", engines.ENGINES.get("reverse"))
    engines.register_engine("reverse", ReverseEngine)
    src = scenes(tmp_path / "in", 7)
    common = [str(src), *BASE, "-q", "a", "-q", "b", "--batch-size", "2", "--save-heatmaps", "--overlays",
              "--format", "masks-instance"]
    assert main(["label", *common, "--out", str(tmp_path / "local")]) == 0
    from ovlabel import Pipeline
    from ovlabel.cli import _label_overrides, build_parser
    from ovlabel.config import load_config

    args = build_parser().parse_args(["label", *common, "--out", str(tmp_path / "reverse")])
    pipe = Pipeline(load_config(None, _label_overrides(args)))
    summary = pipe.run([str(src)], tmp_path / "reverse", queries=["a", "b"], engine="reverse")
    assert summary["counts"]["labelled"] == 7
    assert_same_outputs(tmp_path / "local", tmp_path / "reverse")
    order = [r.split('"id": ')[1].split(",")[0]
             for r in (tmp_path / "reverse" / "records" / "records.jsonl").read_text().splitlines()]
    assert order[:2] == ["7", "5"]  # it did run last batch first


def test_an_unknown_engine_lists_the_registered_ones(tmp_path):
    import pytest

    from ovlabel import InputError, Pipeline
    from ovlabel.config import load_config

    with pytest.raises(InputError, match="local, ray"):
        Pipeline(load_config(None)).run([str(tmp_path)], tmp_path / "o", queries=["a"], engine="dask")


def test_the_readmes_python_examples_compile_and_name_what_exists():
    """Every ```python block of the README compiles, every ``from ovlabel… import X`` resolves, every
    ``ovlabel.X`` exists, and every keyword given to ``Pipeline.run`` is one of its parameters."""
    import importlib
    import inspect
    import re

    import ovlabel
    from ovlabel.pipeline.runner import Pipeline

    text = (ROOT.parent.parent / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    run_params = set(inspect.signature(Pipeline.run).parameters)
    for block in blocks:
        tree = ast.parse(block)  # a SyntaxError names the example
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ovlabel"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"README: {node.module} has no {alias.name}"
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ovlabel":
                assert hasattr(ovlabel, node.attr), f"README: ovlabel has no {node.attr}"
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "run" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "pipe":
                unknown = {k.arg for k in node.keywords} - run_params
                assert not unknown, f"README: Pipeline.run takes no {unknown}"
