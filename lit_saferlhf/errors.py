"""The project's own errors: bad input the user can fix, reported by the CLI as one line and exit status 2.

Everything the user controls (data files, settings, model dirs, disk space) fails with a subclass
of :class:`LitSafeRLHFError` whose message says where (file and line or record, or the config
key), what was expected and what was found. ``lit-saferlhf`` prints that message alone (no
traceback) and exits with status 2; ``--traceback`` or ``LIT_SAFERLHF_TRACEBACK=1`` shows the
traceback too. Any other exception is a bug and keeps its traceback.

:func:`expected_error` finds our error inside the exceptions that wrap it (jsonargparse's "Does not
validate against any of the Union subtypes", Lightning's hooks) and turns a full disk
(``ENOSPC``) into :class:`DiskFullError`.
"""

from __future__ import annotations

import argparse
import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from jsonargparse import Namespace

EXIT_STATUS = 2
"""The exit status of ``lit-saferlhf`` for an error of the user's input (argparse's status for usage errors)."""
TRACEBACK_VARIABLE = "LIT_SAFERLHF_TRACEBACK"
"""Set to ``1`` to see the traceback of our errors too."""
NO_SPACE = os.strerror(errno.ENOSPC)
"""The system's words for ENOSPC ("No space left on device"), also found in errors of libraries that hide the errno."""
NOT_GIVEN = object()
"""``ConfigError``'s ``found`` when the message is a sentence of its own."""
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed")
"""What ``torch.save`` says (a RuntimeError without an errno) when a write comes up short, e.g. on a full disk."""


class LitSafeRLHFError(Exception):
    """An error in the user's input; its message names the place, what was expected and what was found."""


class ConfigError(LitSafeRLHFError, ValueError):
    """A setting out of its domain, or settings that do not go together.

    Args:
        key: The config key, e.g. ``lr`` or ``data.init_args.val_fraction``. A setting that does not
            know where it sits in the config names its own field; the CLI then replaces the key by the
            full key path that holds ``found`` (see :func:`locate`).
        expected: What the setting must be, e.g. ``a number > 0``.
        found: The value found; left out, ``expected`` is the whole message after the key.
    """

    def __init__(self, key: str, expected: str, found: Any = NOT_GIVEN) -> None:
        super().__init__(key, expected, found)
        self.key, self.expected, self.found = key, expected, found

    def __str__(self) -> str:
        if self.found is NOT_GIVEN:
            return f"{self.key}: {self.expected}"
        return f"{self.key}: expected {self.expected}, found {_shown(self.found)}"


class DataError(LitSafeRLHFError, ValueError):
    """Input data that cannot be used as a whole (no training data left, an unreadable file)."""


class InputNotFoundError(LitSafeRLHFError, FileNotFoundError):
    """A data file, model dir or checkpoint that is not there (the message names the path)."""


class ModelDirError(ConfigError, FileNotFoundError):
    """A model dir that is not there (or not of the kind its role needs).

    Args:
        key: The config key that names the dir, e.g. ``policy`` (located like :class:`ConfigError`'s).
        path: The path given.
        problem: What is wrong with it.
        detail: More about it (e.g. why the hub did not have it), shown after the path.
    """

    def __init__(self, key: str, path: str, problem: str = "model dir not found", detail: str = "") -> None:
        super().__init__(key, "a model dir or a hub name", path)
        self.problem, self.detail = problem, detail

    def __str__(self) -> str:
        return f"{self.key}: {self.problem}: {self.found}" + (f" ({self.detail})" if self.detail else "")


class ModelLayoutError(LitSafeRLHFError, ValueError):
    """A model dir whose files do not fit its role (a score model as the policy, a head of the wrong shape).

    The message starts with the dir (or the setting that names it) and says what was expected and found.
    """


class MissingTensorError(ModelLayoutError, KeyError):
    """A model dir whose checkpoint lacks a tensor its layout needs."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""  # KeyError's own str() would quote the message


class HardwareError(ConfigError, RuntimeError):
    """A setting this machine cannot run (QLoRA without a CUDA GPU)."""


class StageError(LitSafeRLHFError, RuntimeError):
    """A pipeline stage that ended without doing its part (e.g. writing its export)."""


class UsageError(LitSafeRLHFError):
    """A command line that the command's argument parser refuses (a missing option, a value of the wrong type)."""


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` of a project command whose parse errors go to the CLI's error boundary.

    argparse prints the usage and exits by itself; here a parse error raises :class:`UsageError`, which
    ``lit-saferlhf`` prints as one ``error: PROG: MESSAGE`` line (exit status 2).
    """

    def error(self, message: str) -> NoReturn:
        """Raise :class:`UsageError` instead of printing the usage and exiting."""
        raise UsageError(f"{self.prog}: {message} (`{self.prog} --help` lists the options)")


class HubError(DataError, RuntimeError):
    """A hub dataset or model that could not be loaded (offline, a typo in the name)."""


class RunConflictError(LitSafeRLHFError, RuntimeError):
    """Outputs of another run: a run dir it holds locked, checkpoints it wrote (the message says how to go on)."""


class MissingExtraError(LitSafeRLHFError, ImportError):
    """An optional dependency the input needs is not installed (the message says which extra to install)."""


class DiskFullError(LitSafeRLHFError, OSError):
    """The disk filled up while writing ``path``."""

    def __init__(self, path: str | Path | None, detail: str = "") -> None:
        where = str(path) if path is not None else "(a file whose name the system did not report)"
        super().__init__(f"disk full while writing {where}" + (f" ({detail})" if detail else ""))
        self.path = path


def output_dir(path: str | Path, key: str) -> Path:
    """Create the output dir ``path`` (with its parents) and try a write in it; a :class:`ConfigError` if either fails.

    The write is a real one (an empty file, removed at once): ``os.access`` says yes to root whatever the mode bits
    say, and cannot know a file system that refuses new files (``/sys``, some FUSE mounts).

    Args:
        path: The dir to write into.
        key: The option that names it (``--out``), for the message.
    """
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise DiskFullError(path, error.strerror or "") from error
        reason = error.strerror or str(error)
        raise ConfigError(key, f"a dir that can be created and written to, found {str(path)!r} ({reason})") from error
    return Path(path)


def require(condition: bool, key: str, expected: str, found: Any) -> None:
    """Raise ``ConfigError(key, expected, found)`` unless ``condition`` holds (a setting's domain check)."""
    if not condition:
        raise ConfigError(key, expected, found)


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or during, depth first, each once."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [linked for linked in (current.__context__, current.__cause__) if linked is not None]


def expected_error(error: BaseException) -> LitSafeRLHFError | None:
    """Our error in ``error``'s chain (a full disk becomes a :class:`DiskFullError`), or None for a bug."""
    for linked in chain(error):
        if isinstance(linked, LitSafeRLHFError):
            return linked
        if isinstance(linked, OSError) and linked.errno == errno.ENOSPC:
            return DiskFullError(linked.filename, linked.strerror or "")
        if NO_SPACE in str(linked):  # a library's own error around an ENOSPC (safetensors, tokenizers: Rust IO)
            return DiskFullError(None, " ".join(str(linked).split())[:200])
    return None


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Report a full disk while writing ``path`` as :class:`DiskFullError` naming ``path``.

    Besides ``OSError(ENOSPC)``, two library errors without an errno count as a full disk here, with
    their words kept in the message: ``torch.save``'s RuntimeError for a short write (``unexpected pos
    ...``), and errors whose text holds the system's "No space left on device" (safetensors and
    tokenizers report their Rust IO errors so).
    """
    try:
        yield
    except Exception as error:
        if isinstance(error, LitSafeRLHFError) or not _disk_full(error):
            raise
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise DiskFullError(path, error.strerror or "") from error
        raise DiskFullError(path, " ".join(str(error).split()).strip()[-200:]) from error


def _disk_full(error: Exception) -> bool:
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno == errno.ENOSPC
    if isinstance(error, RuntimeError) and any(failure in str(error) for failure in _TORCH_WRITE_FAILURES):
        return True
    return NO_SPACE in str(error)


def locate(error: ConfigError, config: Namespace) -> None:
    """Replace a setting's own field name in ``error.key`` by the full config key that holds ``error.found``.

    Args:
        error: Raised by a setting that knows its field (``lr``) but not where it sits in the config.
        config: The parsed config of the command (a subcommand's, for ``fit``).
    """
    if error.found is NOT_GIVEN:
        return
    matches = [key for key, value in config.items() if _ends_with(key, error.key) and _same(value, error.found)]
    if matches:
        error.key = " or ".join(matches)


def _ends_with(key: str, suffix: str) -> bool:
    return key == suffix or key.endswith("." + suffix)


def _same(value: Any, found: Any) -> bool:
    """Equal, with lists and tuples alike but ``True`` and ``1`` apart."""
    if isinstance(value, list | tuple) and isinstance(found, list | tuple):
        value, found = tuple(value), tuple(found)
    return isinstance(value, bool) == isinstance(found, bool) and value == found
