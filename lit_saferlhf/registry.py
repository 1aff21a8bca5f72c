"""Find the swappable parts: the built-ins and those other packages register by entry point.

jsonargparse (and so LightningCLI) resolves a short class name such as ``solver: PIDLagrangian``
among the subclasses of ``ConstraintSolver`` that have been imported. Calling
``load_solver_plugins()`` before parsing imports them all, so a YAML can name a third-party solver
by its class name as well as by its full class path. A package registers its solvers in its own
``pyproject.toml``::

    [project.entry-points."lit_saferlhf.solvers"]
    HalfStep = "my_lab_solvers:HalfStep"

Name each entry point after its class: jsonargparse matches the class's ``__name__``. Advantage
estimators work the same way under ``lit_saferlhf.advantages`` (``load_advantage_plugins()``).
"""

from __future__ import annotations

import inspect
from importlib.metadata import EntryPoint, entry_points

import lit_saferlhf_plugins.advantages as builtin_advantages
import lit_saferlhf_plugins.solvers as builtin
from lit_saferlhf import advantages
from lit_saferlhf.errors import LitSafeRLHFError
from lit_saferlhf.solvers import ENTRY_POINT_GROUP, ConstraintSolver


class PluginError(LitSafeRLHFError, RuntimeError):
    """An entry point failed to load, does not name a subclass of its group's contract, or clashes.

    An installed plugin is the user's setting: ``lit-saferlhf`` reports it in one line (exit status 2).
    """


def load_solver_plugins() -> dict[str, type[ConstraintSolver]]:
    """Import the built-in solvers and every solver registered under ``ENTRY_POINT_GROUP``.

    Returns:
        Solver name (the class name for built-ins, the entry-point name otherwise) -> class.

    Raises:
        PluginError: An entry point fails to import, does not name a concrete
            ``ConstraintSolver`` subclass, or reuses a name already taken by another class. The
            message names the entry point and the distribution that declares it.
    """
    builtins = {name: getattr(builtin, name) for name in builtin.__all__}
    return _load_group(ENTRY_POINT_GROUP, ConstraintSolver, builtins, "solver")


def load_advantage_plugins() -> dict[str, type[advantages.AdvantageEstimator]]:
    """Import the built-in advantage estimators and those registered under ``lit_saferlhf.advantages``.

    Returns:
        Estimator name -> class (``GAE``, ``GroupNormalized``, ``LeaveOneOut`` and every entry point).

    Raises:
        PluginError: As :func:`load_solver_plugins`, for an advantage-estimator entry point.
    """
    builtins = {"GAE": advantages.GAE} | {
        name: getattr(builtin_advantages, name) for name in builtin_advantages.__all__
    }
    return _load_group(advantages.ENTRY_POINT_GROUP, advantages.AdvantageEstimator, builtins, "advantage estimator")


def _load_group(group: str, base: type, builtins: dict[str, type], kind: str) -> dict[str, type]:
    """The built-ins plus every entry point of ``group``, each checked to be a concrete ``base`` subclass."""
    found = dict(builtins)
    for entry_point in entry_points(group=group):
        loaded = _load(entry_point, base, kind)
        taken = found.get(entry_point.name)
        if taken is not None and taken is not loaded:
            raise PluginError(
                f"{_describe(entry_point, kind)} registers {_qualname(loaded)} under the name {entry_point.name!r}, "
                f"already taken by {_qualname(taken)}; rename the entry point and its class"
            )
        found[entry_point.name] = loaded
    return found


def _load(entry_point: EntryPoint, base: type, kind: str) -> type:
    """Import one entry point and check that it names a concrete subclass of ``base``."""
    try:
        loaded = entry_point.load()
    except Exception as err:  # any failure inside a third-party import is that plugin's fault
        raise PluginError(f"{_describe(entry_point, kind)} failed to load: {type(err).__name__}: {err}") from err
    if not (isinstance(loaded, type) and issubclass(loaded, base)):
        raise PluginError(
            f"{_describe(entry_point, kind)} loads {loaded!r}, which is not a subclass of {_qualname(base)}"
        )
    if inspect.isabstract(loaded):
        raise PluginError(f"{_describe(entry_point, kind)} loads {_qualname(loaded)}, which is abstract")
    return loaded


def _describe(entry_point: EntryPoint, kind: str) -> str:
    """Name an entry point, its target and the distribution that declares it, for error messages."""
    dist = getattr(entry_point, "dist", None)
    source = "an unknown distribution" if dist is None else f"distribution {dist.name} {dist.version}"
    return (
        f"{kind} entry point {entry_point.name!r} (= {entry_point.value!r}, group {entry_point.group!r}) from {source}"
    )


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
