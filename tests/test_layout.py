"""The code's layout: no two project modules import each other (directly or around a circle, lazily or not), no
product file is named like a test, the command-line tools live in tools/."""
import ast
import io
import os
import re
import subprocess
import sys
import tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {"tests", ".git", ".ci", "data", "docs", "configs", "__pycache__"}


def project_modules():
    """{module name: file} of every product .py file (tests excluded)."""
    mods = {}
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.startswith(".")]
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), REPO)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                mods[".".join(rel)] = os.path.join(folder, f)
    return mods


def imports_of(name, path, mods):
    """Project modules ``name`` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    is_pkg = path.endswith("__init__.py")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:  # import a.b.c where only a.b is ours
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def test_no_import_cycles():
    mods = project_modules()
    graph = {m: imports_of(m, p, mods) for m, p in mods.items()}
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert "datasets.build" not in graph["datasets.check"]  # the image-check library needs no dataset registry


# Layers, lowest first: a module may import its own layer and the ones below, never one above. The methods' packages
# sit beside model/ (they build on it; model/build.py builds any method's model through the registry), except the
# registry and each method's options module, which the one option table (utils/options.py) reads: those are leaves.
LAYERS = (("utils",), ("model", "datasets", "solver", "methods"), ("processor", "search"),
          ("tools", "train", "test", "visualize", "benchmarks"))


def layer_of(module):
    parts = module.split(".")
    if module == "methods.registry" or (parts[0] == "methods" and parts[-1] == "options"):
        return 0
    return next(i for i, names in enumerate(LAYERS) if parts[0] in names)


def test_nothing_imports_upward():
    """utils/ imports no model, dataset, solver, processor or search code; model/, datasets/, solver/ import neither
    each other's layer above them nor processor/ or search/ (lazily or not)."""
    mods = project_modules()
    upward = sorted(f"{m} -> {n}" for m, p in mods.items() for n in imports_of(m, p, mods)
                    if layer_of(n) > layer_of(m))
    assert upward == []


def test_the_cycle_finder_finds_a_lazy_import(tmp_path):
    """The finder sees imports inside functions (as datasets.check's main did)."""
    mods = {"a": str(tmp_path / "a.py"), "b": str(tmp_path / "b.py")}
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    assert imports_of("a", mods["a"], mods) == {"b"} and imports_of("b", mods["b"], mods) == {"a"}


def test_no_product_file_is_named_like_a_test():
    named = [p for m, p in project_modules().items()
             if os.path.basename(p).startswith("test_") or os.path.basename(p).endswith("_test.py")]
    assert named == []


def test_tools_help_takes_the_datasets_from_the_registry():
    from datasets.build import DATASET_REGISTRY
    proc = subprocess.run([sys.executable, "-m", "tools.check_dataset", "--help"], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert ", ".join(DATASET_REGISTRY) in " ".join(proc.stdout.split())
    assert "datasets/check.py" not in open(os.path.join(REPO, "tools", "check_dataset.py")).read().split('"""')[2]


# ------------------------------------------------------------------------------------- the core names no method
# Words that name a method or one method's parts (RDE's branches, CCD, its labels; TBPS-CLIP).
METHOD_WORDS = re.compile(r"(?i)(?<![a-z])(rde|tse|bge|ccd|tbps|two_branch|is_rde|label_hat)(?![a-z])")


def core_files():
    """The core's product files: the trainer, setup, evaluator and metrics, data pipeline, solver, search package,
    weight reading and the backbone, the entry points."""
    out = []
    for m, p in sorted(project_modules().items()):
        rel = os.path.relpath(p, REPO).replace(os.sep, "/")
        if (rel.split("/")[0] in ("processor", "solver", "search", "datasets", "utils")
                or rel in ("model/pretrained.py", "model/clip_model.py", "train.py", "test.py", "visualize.py")):
            out.append(rel)
    return out


def method_names_in(source: str):
    """(line, token) of every name or string in ``source`` that names a method, outside comments, docstrings and
    import lines (an import that re-exports a method's public name where its own code has it is allowed)."""
    hits, prev = [], tokenize.NEWLINE
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.STRING and prev in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.NL):
            prev = tok.type  # a docstring (a string standing alone as a statement)
            continue
        if tok.type in (tokenize.NAME, tokenize.STRING) and METHOD_WORDS.search(tok.string) \
                and not tok.line.lstrip().startswith(("from ", "import ")):
            hits.append((tok.start[0], tok.string))
        if tok.type not in (tokenize.COMMENT, tokenize.NL):
            prev = tok.type
    return hits


def test_the_core_names_no_method():
    """No code of the core names a method: each method's code lives in its package under methods/, reached through
    methods/registry.py and the hooks of methods/base.py."""
    hits = [f"{f}:{line}: {tok}" for f in core_files()
            for line, tok in method_names_in(open(os.path.join(REPO, f), encoding="utf-8").read())]
    assert hits == [], "core code names a method:\n" + "\n".join(hits)
    assert len(core_files()) > 40  # the rule reads the whole core


def test_the_method_name_finder_sees_code_not_prose():
    src = ('"""RDE is described here."""\n'
           'import x  # rde\n'
           'from methods.rde.ccd import split_prob  # a re-export\n'
           'def f(model):\n'
           '    """The TSE branch."""\n'
           '    if is_rde(model):  # RDE\n'
           '        return model.encode_image_tse(1)\n'
           '    return {"bge": 1, "other": "label_hat"}\n')
    assert [t for _, t in method_names_in(src)] == ["is_rde", "encode_image_tse", '"bge"', '"label_hat"']


def test_every_method_plugs_in_through_the_registry():
    """Each registered method has its two modules and a Method whose name is its registry key; the core finds the
    methods only there."""
    from methods.base import Method
    from methods.registry import METHODS, get_method, method_options

    for name in METHODS:
        method = get_method(name)
        assert isinstance(method, Method) and method.name == name
        assert method.default_feature_set in method.feature_sets
        opts = method_options(name)
        assert set(opts.CONTRASTIVE_LOSSES) <= set(opts.LOSSES) and callable(opts.check_options)
