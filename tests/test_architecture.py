"""Module boundaries of STYLE.md §1, checked on the source by parsing every module (nothing is imported).

What counts as an import: ``import a.b``, ``from a import b`` (``a.b`` when it is a module, else
``a``), relative imports resolved against the importing module, ``importlib.import_module("a.b")``
with a literal name, and all of these inside functions (lazy imports count) and under
``if TYPE_CHECKING:``. An import names the deepest project module it reaches: importing a package
depends on its ``__init__``, but the parent packages that Python initialises on the way are not
counted as edges (a submodule importing a sibling would otherwise always form a cycle with its
package's ``__init__``). Built-in plugins (``plugins/``) are the modules of ``lit_saferlhf_plugins``.

Rules:

- No import cycle among the project's modules, lazy imports included (``TYPE_CHECKING`` blocks
  excluded: they never run, and they are the usual way to annotate without a cycle).
- Layers (``test_layer``): ``losses`` imports torch, the standard library and itself; ``models`` imports
  only ``errors``, ``losses``, ``models`` and third parties; the contracts (``solvers.py``,
  ``objectives.py``, ``advantages.py``, ``generators.py``, ``scorers.py``) import no plugin, stage, command or the cli;
  plugins import only contracts, ``losses``, ``errors``, ``data``, ``models``, their own package and third
  parties; stages never import a plugin; nothing imports ``lit_saferlhf.cli``; ``commands`` may import
  anything else. ``import lit_saferlhf.losses`` runs with torch alone (its import-time closure).
- ``lit_saferlhf/`` holds at most 11 top-level modules (the cli, errors, the registry, five contracts, optim,
  strategies and the package's ``__init__``): every ``*.py`` directly in it, ``__init__.py``
  included, since it is a file a reader sees there too.
- A stage reads nothing of a plugin that its contract does not declare: every attribute read on a
  stage's plugin (``self.solver.X``, ``self.objective.solver.X``, a local alias of them...) is a method,
  class attribute, class annotation or ``self.X`` of ``__init__`` of the contract (or of a contract it
  subclasses), and stages never ``getattr``/``hasattr`` a plugin. A stage's plugin attributes are those
  assigned in ``__init__`` from a parameter annotated with a contract (``solver: ConstraintSolver``).
- Nothing in ``lit_saferlhf/`` branches on a concrete plugin class: no ``isinstance``/``issubclass``
  against, ``type(x) is``, or ``type(x).__name__ ==`` a class of ``lit_saferlhf_plugins`` or a
  contract's default (``GAE``, ``HFGenerate``).
- ``lit_saferlhf_plugins`` is installed and resolves to ``plugins/``.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lit_saferlhf"
SOURCES = {"lit_saferlhf": PACKAGE, "lit_saferlhf_plugins": ROOT / "plugins"}
CONTRACT_MODULES = ("solvers", "objectives", "advantages", "generators", "scorers")
MAX_TOP_LEVEL_MODULES = 11
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}


# ---------------------------------------------------------------------------------------------------------------------
# The project's modules and their imports
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str  # lit_saferlhf.stages.ppo_lag
    path: Path
    is_package: bool

    @property
    def where(self) -> str:
        return self.path.relative_to(ROOT).as_posix()

    @property
    def tree(self) -> ast.Module:
        return parse(self.path)


@dataclass(frozen=True)
class Import:
    source: Module
    target: str  # the resolved module name, project or third party
    line: int
    lazy: bool  # inside a function
    type_checking: bool  # under `if TYPE_CHECKING:`

    def __str__(self) -> str:
        how = " (lazy)" if self.lazy else " (TYPE_CHECKING)" if self.type_checking else ""
        return f"{self.source.where}:{self.line}: imports {self.target}{how}"


@cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@cache
def modules() -> dict[str, Module]:
    found = {}
    for top, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            is_package = parts[-1] == "__init__"
            name = ".".join((top, *(parts[:-1] if is_package else parts)))
            found[name] = Module(name, path, is_package)
    return found


def layer(name: str) -> str | None:
    """The layer of a project module (None for a third party): a folder, a top-level module or ``contracts``."""
    if name.split(".")[0] == "lit_saferlhf_plugins":
        return "plugins"
    parts = name.split(".")
    if parts[0] != "lit_saferlhf":
        return None
    if len(parts) == 1:
        return "package"
    return "contracts" if parts[1] in CONTRACT_MODULES else parts[1]


def canonical(name: str) -> str:
    """``plugins.x`` (the folder, importable from the repository root) is ``lit_saferlhf_plugins.x``."""
    head, _, rest = name.partition(".")
    return f"lit_saferlhf_plugins.{rest}".rstrip(".") if head == "plugins" else name


def deepest_module(name: str) -> str:
    """The longest prefix of ``name`` that is a project module (``name`` itself for a third party)."""
    name = canonical(name)
    if layer(name) is None:
        return name
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules():
            return ".".join(parts[:end])
    return name


class ImportCollector(ast.NodeVisitor):
    def __init__(self, module: Module) -> None:
        self.module, self.imports = module, []
        self.function_depth = self.type_checking_depth = 0

    def add(self, target: str, node: ast.AST) -> None:
        self.imports.append(
            Import(
                self.module, deepest_module(target), node.lineno, self.function_depth > 0, self.type_checking_depth > 0
            )
        )

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module.name.split(".")
            package = package if self.module.is_package else package[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        for alias in node.names:
            # `from a import b` imports the module a.b when there is one, else takes the attribute b of a.
            submodule = canonical(f"{base}.{alias.name}")
            self.add(submodule if submodule in modules() else base, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        first = node.args[0] if node.args else None
        if name in ("import_module", "__import__") and isinstance(first, ast.Constant) and isinstance(first.value, str):
            self.add(first.value, node)
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1

    visit_AsyncFunctionDef = visit_Lambda = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        guarded = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        self.visit(node.test)
        self.type_checking_depth += guarded
        for child in node.body:
            self.visit(child)
        self.type_checking_depth -= guarded
        for child in node.orelse:
            self.visit(child)


@cache
def imports_of(name: str) -> tuple[Import, ...]:
    collector = ImportCollector(modules()[name])
    collector.visit(modules()[name].tree)
    return tuple(collector.imports)


def all_imports() -> Iterator[Import]:
    for name in modules():
        yield from imports_of(name)


def test_the_module_scan_sees_the_project() -> None:
    """Guards the other tests against checking nothing: the folders are found and imports resolve."""
    layers = {layer(name) for name in modules()}
    expected = {"losses", "models", "stages", "data", "callbacks", "commands", "plugins", "contracts", "cli"}
    assert expected <= layers, f"the scan misses layers {expected - layers}"
    targets = {imp.target for imp in imports_of("lit_saferlhf.stages.ppo_lag")}
    assert "lit_saferlhf.solvers" in targets, f"imports of stages.ppo_lag are not resolved: {sorted(targets)}"


# ---------------------------------------------------------------------------------------------------------------------
# No import cycle
# ---------------------------------------------------------------------------------------------------------------------


def test_no_import_cycle() -> None:
    """Tarjan's strongly connected components of the import graph; one cycle path is reported per component."""
    edges: dict[str, dict[str, Import]] = {name: {} for name in modules()}
    for imp in all_imports():
        if imp.target in modules() and imp.target != imp.source.name and not imp.type_checking:
            edges[imp.source.name].setdefault(imp.target, imp)

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def connect(node: str) -> None:  # the graph has ~100 nodes: recursion depth is no concern
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in edges:
        if node not in index:
            connect(node)

    def cycle_through(start: str, component: set[str]) -> list[Import]:
        """The shortest path start -> ... -> start inside the component (breadth first)."""
        paths = {start: []}
        frontier = [start]
        while frontier:
            following = []
            for node in frontier:
                for target, imp in edges[node].items():
                    if target == start:
                        return [*paths[node], imp]
                    if target in component and target not in paths:
                        paths[target] = [*paths[node], imp]
                        following.append(target)
            frontier = following
        raise AssertionError("unreachable: a strongly connected component has a cycle")

    reports = []
    for component in components:
        path = cycle_through(min(component), component)
        chain = " -> ".join([imp.source.name for imp in path] + [path[0].source.name])
        reports.append(f"cycle {chain}\n" + "\n".join(f"    {imp}" for imp in path))
    if reports:
        pytest.fail("rule: no import cycle (lazy imports count; move code down a layer)\n" + "\n".join(reports), False)


# ---------------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRule:
    id: str
    text: str
    applies: Callable[[Module], bool]
    forbids: Callable[[str], bool]  # on the import's target


def in_layers(*layers: str) -> Callable[[Module], bool]:
    return lambda module: layer(module.name) in layers


def project_outside(*allowed: str) -> Callable[[str], bool]:
    return lambda target: layer(target) is not None and layer(target) not in allowed


def project_in(*forbidden: str) -> Callable[[str], bool]:
    return lambda target: layer(target) in forbidden


def torch_or_stdlib(target: str) -> bool:
    return target.split(".")[0] in STDLIB | {"torch"}


LAYER_RULES = [
    LayerRule(
        "losses-torch-only",
        "`losses` imports torch, the standard library and its own package only",
        in_layers("losses"),
        lambda target: layer(target) not in (None, "losses") or (layer(target) is None and not torch_or_stdlib(target)),
    ),
    LayerRule(
        "models-below-stages",
        "`models` imports only `errors`, `losses`, `models` and third parties (no stage, data, command, callback)",
        in_layers("models"),
        project_outside("errors", "losses", "models"),
    ),
    LayerRule(
        "contracts-know-no-plugin",
        "contracts (solvers, objectives, advantages, generators) import no plugin, stage, command or cli",
        in_layers("contracts"),
        project_in("plugins", "stages", "commands", "cli"),
    ),
    LayerRule(
        "plugins-see-contracts-only",
        "plugins import only contracts, `losses`, `errors`, `data`, `models`, their own package and third parties "
        "(never stages, commands, callbacks, cli, registry)",
        in_layers("plugins"),
        project_outside("contracts", "losses", "errors", "data", "models", "plugins"),
    ),
    LayerRule(
        "stages-no-concrete-plugin",
        "stages never import a concrete plugin (lit_saferlhf_plugins): they use the contract only",
        in_layers("stages"),
        project_in("plugins"),
    ),
    LayerRule(
        "nothing-imports-cli",
        "nothing imports lit_saferlhf.cli (commands share lit_saferlhf.commands.fit instead)",
        lambda module: module.name != "lit_saferlhf.cli",
        lambda target: target == "lit_saferlhf.cli",
    ),
]


@pytest.mark.parametrize("rule", LAYER_RULES, ids=lambda rule: rule.id)
def test_layer(rule: LayerRule) -> None:
    broken = [imp for imp in all_imports() if rule.applies(imp.source) and rule.forbids(imp.target)]
    if broken:
        pytest.fail(f"rule: {rule.text}\n" + "\n".join(f"    {imp}" for imp in broken), pytrace=False)


def test_importing_losses_needs_torch_only() -> None:
    """``import lit_saferlhf.losses`` runs the package root, then losses and whatever they import at import time."""
    seen, todo, third_parties = set(), ["lit_saferlhf", "lit_saferlhf.losses"], []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for imp in imports_of(name):
            if imp.lazy or imp.type_checking:
                continue
            if layer(imp.target) is not None:
                parts = imp.target.split(".")
                todo += [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
            elif not torch_or_stdlib(imp.target):
                third_parties.append(imp)
    if third_parties:
        lines = "\n".join(f"    {imp}" for imp in third_parties)
        pytest.fail(f"rule: `import lit_saferlhf.losses` works with nothing but torch installed\n{lines}", False)


def test_few_top_level_modules() -> None:
    top_level = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top_level) <= MAX_TOP_LEVEL_MODULES, (
        f"lit_saferlhf/ holds {len(top_level)} top-level modules (__init__.py included), at most "
        f"{MAX_TOP_LEVEL_MODULES} allowed: {top_level}; move code into a folder (losses, models, data, ...)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Stages read only what a contract declares
# ---------------------------------------------------------------------------------------------------------------------

OBJECT_ATTRIBUTES = frozenset(dir(object))


@dataclass
class Contract:
    name: str
    module: Module
    node: ast.ClassDef
    attributes: dict[str, str | None] = field(default_factory=dict)  # declared name -> contract it holds, if any


def mentioned_contract(annotation: ast.AST | None, names: set[str] | dict) -> str | None:
    """The contract named in an annotation (``ConstraintSolver | None``, ``Optional[Objective]``, ``"Generator"``)."""
    if annotation is None:
        return None
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        try:
            annotation = ast.parse(annotation.value, mode="eval")
        except SyntaxError:
            return None
    for node in ast.walk(annotation):
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if name in names:
            return name
    return None


def self_assignments(function: ast.FunctionDef) -> Iterator[tuple[str, ast.AST | None, ast.AST | None]]:
    """``(attribute, value, annotation)`` of every ``self.X = value`` / ``self.X: T = value`` in a method.

    ``self.a, self.b = x, y`` pairs element-wise.
    """
    for node in ast.walk(function):
        if isinstance(node, ast.AnnAssign):
            pairs, annotation = [(node.target, node.value)], node.annotation
        elif isinstance(node, ast.Assign):
            pairs, annotation = [], None
            for target in node.targets:
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    pairs += list(zip(target.elts, node.value.elts, strict=False))
                elif isinstance(target, ast.Tuple):
                    pairs += [(element, None) for element in target.elts]
                else:
                    pairs.append((target, node.value))
        elif isinstance(node, ast.AugAssign):
            pairs, annotation = [(node.target, node.value)], None
        else:
            continue
        for target, value in pairs:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                yield target.attr, value, annotation


def method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | None:
    return next((node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == name), None)


def parameter_annotations(function: ast.FunctionDef | None) -> dict[str, ast.AST | None]:
    if function is None:
        return {}
    arguments = function.args
    return {arg.arg: arg.annotation for arg in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]}


def base_names(cls: ast.ClassDef) -> list[str]:
    return [
        base.id if isinstance(base, ast.Name) else base.attr
        for base in cls.bases
        if isinstance(base, ast.Name | ast.Attribute)
    ]


@cache
def contracts() -> dict[str, Contract]:
    """The ABCs of the contract modules, with what each declares (its own and its contract bases')."""
    classes = {}
    for module_name in CONTRACT_MODULES:
        module = modules()[f"lit_saferlhf.{module_name}"]
        for node in module.tree.body:
            if isinstance(node, ast.ClassDef) and "ABC" in base_names(node):
                classes[node.name] = Contract(node.name, module, node)
    for contract in classes.values():
        declared = contract.attributes
        init = method(contract.node, "__init__")
        parameters = parameter_annotations(init)
        for node in contract.node.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                is_property = any(mentioned_contract(d, {"property", "cached_property"}) for d in node.decorator_list)
                declared[node.name] = mentioned_contract(node.returns, classes) if is_property else None
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                declared[node.target.id] = mentioned_contract(node.annotation, classes)
            elif isinstance(node, ast.Assign):
                declared |= {t.id: None for t in node.targets if isinstance(t, ast.Name)}
        for attribute, value, annotation in self_assignments(init) if init else ():
            if annotation is None and isinstance(value, ast.Name):
                annotation = parameters.get(value.id)
            declared[attribute] = declared.get(attribute) or mentioned_contract(annotation, classes)
    for contract in classes.values():  # inherit from contract bases (one level is all the project has; loop to be safe)
        todo = [base for base in base_names(contract.node) if base in classes]
        while todo:
            base = classes[todo.pop()]
            contract.attributes = base.attributes | contract.attributes
            todo += [name for name in base_names(base.node) if name in classes]
    return classes


def test_the_contracts_are_found() -> None:
    found = {contract.module.name.rsplit(".", 1)[1] for contract in contracts().values()}
    assert found == set(CONTRACT_MODULES), (
        f"expected one ABC (the contract) in each of {CONTRACT_MODULES}, found {sorted(contracts())} in {sorted(found)}"
    )


def stage_plugin_attributes() -> dict[str, dict[str, str]]:
    """Stage class name -> {attribute of self: contract}, from ``__init__`` and stage base classes."""
    own: dict[str, dict[str, str]] = {}
    bases: dict[str, list[str]] = {}
    for module in modules().values():
        if layer(module.name) != "stages":
            continue
        for cls in (node for node in module.tree.body if isinstance(node, ast.ClassDef)):
            bases[cls.name] = base_names(cls)
            attributes = own.setdefault(cls.name, {})
            for node in cls.body:  # class-level `solver: ConstraintSolver`
                contract = mentioned_contract(node.annotation, contracts()) if isinstance(node, ast.AnnAssign) else None
                if contract and isinstance(node.target, ast.Name):
                    attributes[node.target.id] = contract
            init = method(cls, "__init__")
            parameters = {
                name: contract
                for name, annotation in parameter_annotations(init).items()
                if (contract := mentioned_contract(annotation, contracts()))
            }
            for attribute, value, annotation in self_assignments(init) if init else ():
                contract = mentioned_contract(annotation, contracts())
                names = {node.id for node in ast.walk(value) if isinstance(node, ast.Name)} if value else set()
                contract = contract or next((parameters[name] for name in sorted(names & parameters.keys())), None)
                if contract:
                    attributes[attribute] = contract
    resolved = {}
    for name in own:
        attributes, todo = {}, [name]
        while todo:
            current = todo.pop()
            attributes = own.get(current, {}) | attributes
            todo += [base for base in bases.get(current, []) if base in own]
        resolved[name] = attributes
    return resolved


@dataclass(frozen=True)
class StageRead:
    where: str
    line: int
    expression: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: `{self.expression}` {self.problem}"


@dataclass
class PluginTypes:
    """Which expressions of one stage method hold a plugin, and of which contract.

    ``self.<attribute>`` of the stage's plugin attributes, an attribute that the owning contract
    annotates with a contract (``self.objective.solver``), and local names assigned from them
    (``solver = self.objective.solver``, flow-insensitive).
    """

    held: dict[str, str]  # stage attribute -> contract
    local: dict[str, str] = field(default_factory=dict)

    def of(self, expression: ast.AST) -> str | None:
        if isinstance(expression, ast.Name):
            return self.local.get(expression.id)
        if not isinstance(expression, ast.Attribute):
            return None
        if isinstance(expression.value, ast.Name) and expression.value.id == "self":
            return self.held.get(expression.attr)
        owner = self.of(expression.value)
        return contracts()[owner].attributes.get(expression.attr) if owner else None

    def learn_aliases(self, function: ast.AST) -> None:
        assignments = [
            node for node in ast.walk(function)
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        ]  # fmt: skip
        for _ in range(2):  # an alias of an alias
            for node in assignments:
                if contract := self.of(node.value):
                    self.local[node.targets[0].id] = contract


def is_probe(node: ast.AST) -> bool:
    return is_call_to(node, "getattr", "hasattr") and bool(node.args)


def undeclared_reads(module: Module, plugin_attributes: dict[str, dict[str, str]]) -> list[StageRead]:
    problems = set()
    for cls in (node for node in module.tree.body if isinstance(node, ast.ClassDef)):
        held = plugin_attributes.get(cls.name, {})
        functions = [node for node in ast.walk(cls) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
        for function in functions if held else ():
            types = PluginTypes(held)
            types.learn_aliases(function)
            for node in ast.walk(function):
                if isinstance(node, ast.Attribute) and (owner := types.of(node.value)):
                    if node.attr not in contracts()[owner].attributes and node.attr not in OBJECT_ATTRIBUTES:
                        problem = f"reads `{node.attr}`, which {owner} does not declare"
                        problems.add(StageRead(module.where, node.lineno, ast.unparse(node), problem))
                elif is_probe(node) and (owner := types.of(node.args[0])):
                    problem = f"probes the {owner} plugin: declare the attribute on {owner} and read it"
                    problems.add(StageRead(module.where, node.lineno, ast.unparse(node), problem))
    return sorted(problems, key=lambda read: (read.line, read.expression))


STAGE_MODULES = sorted(name for name in modules() if layer(name) == "stages" and not modules()[name].is_package)


@pytest.mark.parametrize("name", STAGE_MODULES, ids=lambda name: name.rsplit(".", 1)[1])
def test_stage_reads_only_what_the_contract_declares(name: str) -> None:
    problems = undeclared_reads(modules()[name], stage_plugin_attributes())
    if problems:
        pytest.fail(
            "rule: a stage reads nothing of a plugin that its contract does not declare (no getattr/hasattr probing; "
            "if the stage needs to know something, the contract gains a method or attribute for it)\n"
            + "\n".join(f"    {problem}" for problem in problems),
            pytrace=False,
        )


def test_the_stage_plugin_scan_sees_the_plugins() -> None:
    """Guards the rule above against checking nothing."""
    attributes = stage_plugin_attributes()
    assert attributes.get("PPOLagrangian", {}).get("advantage") == "AdvantageEstimator", attributes.get("PPOLagrangian")
    assert attributes["PPOLagrangian"].get("generator") == "Generator", attributes["PPOLagrangian"]
    assert attributes.get("PreferenceOptimization", {}).get("objective") == "Objective", attributes
    assert contracts()["Objective"].attributes.get("solver") == "ConstraintSolver"


# ---------------------------------------------------------------------------------------------------------------------
# No branching on a concrete plugin class
# ---------------------------------------------------------------------------------------------------------------------


@cache
def concrete_plugin_classes() -> frozenset[str]:
    """Every class of lit_saferlhf_plugins, and the contracts' defaults (a contract module's subclass of its ABC)."""
    names = set()
    for module in modules().values():
        if layer(module.name) == "plugins":
            names |= {node.name for node in ast.walk(module.tree) if isinstance(node, ast.ClassDef)}
    for contract in contracts().values():
        for node in contract.module.tree.body:
            if isinstance(node, ast.ClassDef) and contract.name in base_names(node) and "ABC" not in base_names(node):
                names.add(node.name)
    return frozenset(names)


def names_in(node: ast.AST) -> set[str]:
    return {
        n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node) if isinstance(n, ast.Name | ast.Attribute)
    }


def is_call_to(node: ast.AST, *names: str) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names


def plugin_type_checks(module: Module) -> Iterator[str]:
    plugins = concrete_plugin_classes()
    for node in ast.walk(module.tree):
        if is_call_to(node, "isinstance", "issubclass") and len(node.args) == 2:
            found = names_in(node.args[1]) & plugins
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            found = set()
            if any(is_call_to(side, "type") for side in sides):  # type(x) is GAE
                found = set().union(*(names_in(side) for side in sides if not is_call_to(side, "type"))) & plugins
            if any(isinstance(side, ast.Attribute) and side.attr in ("__name__", "__qualname__") for side in sides):
                strings = {n.value for side in sides for n in ast.walk(side) if isinstance(n, ast.Constant)}
                found |= {value for value in strings if isinstance(value, str)} & plugins  # type(x).__name__ == "DPO"
        else:
            continue
        if found:
            yield f"{module.where}:{node.lineno}: `{ast.unparse(node)}` checks for {', '.join(sorted(found))}"


def test_no_branching_on_a_concrete_plugin_class() -> None:
    assert len(concrete_plugin_classes()) > 5, f"plugin classes not found: {sorted(concrete_plugin_classes())}"
    broken = [problem for module in modules().values() if layer(module.name) != "plugins"
              for problem in plugin_type_checks(module)]  # fmt: skip
    if broken:
        pytest.fail(
            "rule: nothing outside plugins branches on a concrete plugin class (ask the contract instead)\n"
            + "\n".join(f"    {problem}" for problem in broken),
            pytrace=False,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Packaging
# ---------------------------------------------------------------------------------------------------------------------


def test_plugins_are_installed_under_the_project_namespace() -> None:
    spec = importlib.util.find_spec("lit_saferlhf_plugins")  # runs nothing: plugins/__init__.py is not executed
    assert spec is not None, "lit_saferlhf_plugins is not installed (pip install -e .)"
    locations = [Path(location).resolve() for location in spec.submodule_search_locations or []]
    assert locations == [SOURCES["lit_saferlhf_plugins"]], f"lit_saferlhf_plugins resolves to {locations}"
