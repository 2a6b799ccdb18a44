"""The package's layers: every import points down (or within its own layer), none up, and
no module imports itself back through others. README "Layout" draws the same order."""

import ast

from conftest import ROOT

# Lowest first. A module may import from its own layer and the layers below it.
LAYERS = (
    ("errors", "patch_tokens", "parallel"),
    ("data", "models"),
    ("method",),
    ("configs",),
    ("cli", "cli_help", "override_errors", "log_filters", "run_log"),
    ("training",),
    ("evaluation",),
    ("interop",),
    ("tools",),
    ("main",),
)
RANK = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _graph() -> dict[str, set[str]]:
  """module -> the pr_mim_jax modules it imports (anywhere in its body)."""
  graph = {}
  for path in (ROOT / "pr_mim_jax").rglob("*.py"):
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pr_mim_jax"):
        for alias in node.names:
          full = f"{node.module}.{alias.name}"
          is_module = (ROOT / (full.replace(".", "/") + ".py")).exists() or (
              ROOT / full.replace(".", "/")).is_dir()
          deps.add(full if is_module else node.module)
      elif isinstance(node, ast.Import):
        deps.update(a.name for a in node.names if a.name.startswith("pr_mim_jax"))
    graph[name] = deps - {name, "pr_mim_jax"}
  return graph


def _rank(module: str) -> int:
  part = module.split(".")[1]
  assert part in RANK, f"{module}: add its package to LAYERS"
  return RANK[part]


def test_every_import_points_down():
  upward = sorted(f"{m} -> {d}" for m, deps in _graph().items() if m != "pr_mim_jax"
                  for d in deps if _rank(d) > _rank(m))
  assert not upward, upward


def test_no_import_cycles():
  graph = _graph()
  state = {}

  def visit(m, trail):
    if state.get(m) == "done":
      return
    assert state.get(m) != "open", " -> ".join(trail + [m])
    state[m] = "open"
    for d in sorted(graph.get(m, ())):
      visit(d, trail + [m])
    state[m] = "done"

  for m in sorted(graph):
    visit(m, [])


def test_the_layers_cover_every_package_and_top_level_module():
  tops = {p.stem for p in (ROOT / "pr_mim_jax").glob("*.py") if p.stem != "__init__"}
  tops |= {p.name for p in (ROOT / "pr_mim_jax").iterdir() if (p / "__init__.py").exists()}
  assert tops == set(RANK)


def _importers(prefix: str) -> set[str]:
  """Files of the package that import `prefix` (a top-level library) anywhere."""
  found = set()
  for path in (ROOT / "pr_mim_jax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      if any(n == prefix or n.startswith(prefix + ".") for n in names):
        found.add(str(path.relative_to(ROOT / "pr_mim_jax")))
  return found


def test_tensorflow_and_orbax_stay_in_their_modules():
  """TensorFlow only in the input pipeline (data/); clu (which loads TF) only, lazily, in
  the metric writers; orbax only in checkpointing.py."""
  for library in ("tensorflow", "tensorflow_datasets"):
    assert {f for f in _importers(library) if not f.startswith("data/")} == set(), library
  assert _importers("clu") == {"training/metrics.py"}
  assert _importers("orbax") == {"training/checkpointing.py"}
