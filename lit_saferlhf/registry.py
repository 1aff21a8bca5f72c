"""One table of the swappable parts: each plugin kind, its contract, its built-ins and its entry-point group.

jsonargparse (and so LightningCLI) resolves a short class name such as ``solver: PIDLagrangian``
among the imported subclasses of the setting's type. :func:`load_plugins`, called before parsing,
imports every kind's built-ins and every class that other packages register under the kind's
entry-point group, so a YAML can name any of them by class name as well as by full class path. A
package registers its plugins in its own ``pyproject.toml``, one group per kind::

    [project.entry-points."lit_saferlhf.solvers"]
    HalfStep = "my_lab.solvers:HalfStep"

    [project.entry-points."lit_saferlhf.generators"]
    VLLMGenerate = "my_lab.generation:VLLMGenerate"

Name each entry point after its class: jsonargparse matches the class's ``__name__``. Adding a kind
is one row of :data:`KINDS` (``docs/extending.md``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from lit_saferlhf.advantages import GAE, AdvantageEstimator
from lit_saferlhf.errors import LitSafeRLHFError
from lit_saferlhf.generators import Generator, HFGenerate
from lit_saferlhf.objectives import Objective
from lit_saferlhf.scorers import Scorer
from lit_saferlhf.solvers import ConstraintSolver


class PluginError(LitSafeRLHFError, RuntimeError):
    """An entry point failed to load, does not name a subclass of its group's contract, or clashes.

    An installed plugin is the user's setting: ``lit-saferlhf`` reports it in one line (exit status 2).
    """


@dataclass(frozen=True)
class PluginKind:
    """One kind of swappable part."""

    name: str
    """What the kind is called in messages (``solver``)."""
    contract: type
    """The abstract class every plugin of the kind subclasses."""
    group: str
    """The entry-point group under which other packages register plugins of the kind."""
    builtins: str
    """The package of the built-in plugins; its ``__all__`` lists them."""
    defaults: tuple[type, ...] = ()
    """Built-ins that live beside the contract (its one default)."""


KINDS: dict[str, PluginKind] = {
    kind.name: kind
    for kind in (
        PluginKind("solver", ConstraintSolver, "lit_saferlhf.solvers", "lit_saferlhf_plugins.solvers"),
        PluginKind(
            "advantage estimator", AdvantageEstimator, "lit_saferlhf.advantages", "lit_saferlhf_plugins.advantages",
            (GAE,),
        ),
        PluginKind("objective", Objective, "lit_saferlhf.objectives", "lit_saferlhf_plugins.objectives"),
        PluginKind("generator", Generator, "lit_saferlhf.generators", "lit_saferlhf_plugins.generators", (HFGenerate,)),
        PluginKind("scorer", Scorer, "lit_saferlhf.scorers", "lit_saferlhf_plugins.scorers"),
    )
}  # fmt: skip
"""Every plugin kind, by name."""


def load_plugins() -> dict[str, dict[str, type]]:
    """Import the built-ins and every entry point of every kind (what commands call before parsing).

    Returns:
        Kind name -> (plugin name -> class).

    Raises:
        PluginError: As :func:`load_kind`.
    """
    return {name: load_kind(name) for name in KINDS}


def load_kind(name: str) -> dict[str, type]:
    """The built-ins of the kind ``name`` and every class registered under its entry-point group.

    Args:
        name: A key of :data:`KINDS` (``solver``, ``advantage estimator``, ``objective``, ``generator``, ``scorer``).

    Returns:
        Plugin name (the class name for built-ins, the entry-point name otherwise) -> class.

    Raises:
        PluginError: An entry point fails to import, does not name a concrete subclass of the kind's
            contract, or reuses a name already taken by another class. The message names the entry
            point and the distribution that declares it.
    """
    kind = KINDS[name]
    package = importlib.import_module(kind.builtins)
    found = {cls.__name__: cls for cls in kind.defaults} | {name: getattr(package, name) for name in package.__all__}
    for entry_point in entry_points(group=kind.group):
        loaded = _load(entry_point, kind)
        taken = found.get(entry_point.name)
        if taken is not None and taken is not loaded:
            raise PluginError(
                f"{_describe(entry_point, kind)} registers {_qualname(loaded)} under the name {entry_point.name!r}, "
                f"already taken by {_qualname(taken)}; rename the entry point and its class"
            )
        found[entry_point.name] = loaded
    return found


def _load(entry_point: EntryPoint, kind: PluginKind) -> type:
    """Import one entry point and check that it names a concrete subclass of the kind's contract."""
    try:
        loaded = entry_point.load()
    except Exception as err:  # any failure inside a third-party import is that plugin's fault
        raise PluginError(f"{_describe(entry_point, kind)} failed to load: {type(err).__name__}: {err}") from err
    if not (isinstance(loaded, type) and issubclass(loaded, kind.contract)):
        raise PluginError(
            f"{_describe(entry_point, kind)} loads {loaded!r}, which is not a subclass of {_qualname(kind.contract)}"
        )
    if inspect.isabstract(loaded):
        raise PluginError(f"{_describe(entry_point, kind)} loads {_qualname(loaded)}, which is abstract")
    return loaded


def _describe(entry_point: EntryPoint, kind: PluginKind) -> str:
    """Name an entry point, its target and the distribution that declares it, for error messages."""
    dist = getattr(entry_point, "dist", None)
    source = "an unknown distribution" if dist is None else f"distribution {dist.name} {dist.version}"
    return (
        f"{kind.name} entry point {entry_point.name!r} (= {entry_point.value!r}, group {entry_point.group!r}) "
        f"from {source}"
    )


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
