"""``lit_saferlhf.errors``: messages, where a setting's key is found, what counts as ours."""

from __future__ import annotations

import errno

import pytest
from jsonargparse import Namespace

from lit_saferlhf.data.records import BadRecordError
from lit_saferlhf.errors import (
    ConfigError,
    DataError,
    DiskFullError,
    ModelDirError,
    chain,
    expected_error,
    locate,
    require,
)

CONFIG = Namespace(
    model=Namespace(init_args=Namespace(actor_optimizer=Namespace(lr=-1.0), critic_optimizer=Namespace(lr=5e-6))),
    data=Namespace(init_args=Namespace(batch_size=1, shuffle=True)),
)


def test_messages() -> None:
    assert str(ConfigError("lr", "a number > 0", -1.0)) == "lr: expected a number > 0, found -1.0"
    assert str(ConfigError("model", "set exactly one of `path` and `config`")) == (
        "model: set exactly one of `path` and `config`"
    )
    assert str(ModelDirError("policy", "/x")) == "policy: model dir not found: /x"
    assert str(DiskFullError("/a/b.ckpt")) == "disk full while writing /a/b.ckpt"


def test_compatibility_with_the_builtin_errors() -> None:
    assert issubclass(BadRecordError, DataError)
    assert issubclass(DataError, ValueError)
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ModelDirError, FileNotFoundError)
    assert issubclass(DiskFullError, OSError)


def test_locate_finds_the_key_that_holds_the_value() -> None:
    error = ConfigError("lr", "a number > 0", -1.0)
    locate(error, CONFIG)
    assert error.key == "model.init_args.actor_optimizer.lr"


def test_locate_keeps_true_apart_from_1_and_names_every_match() -> None:
    error = ConfigError("batch_size", ">= 2", True)
    locate(error, CONFIG)
    assert error.key == "batch_size"  # 1 == True, but True is not what the config holds
    twice = Namespace(a=Namespace(lr=0.0), b=Namespace(lr=0.0))
    error = ConfigError("lr", "> 0", 0.0)
    locate(error, twice)
    assert error.key == "a.lr or b.lr"


def test_require() -> None:
    require(True, "x", "anything", 1)
    with pytest.raises(ConfigError, match=r"^x: expected >= 1, found 0$"):
        require(False, "x", ">= 1", 0)


def test_our_error_is_found_through_causes_and_contexts() -> None:
    ours = ConfigError("lr", "> 0", -1)
    outer = ValueError("Does not validate against any of the Union subtypes")
    outer.__cause__ = TypeError("wrapper")
    outer.__cause__.__context__ = ours
    assert expected_error(outer) is ours
    assert list(chain(outer))[0] is outer
    assert expected_error(ValueError("a bug")) is None


def test_enospc_becomes_a_full_disk_and_other_os_errors_do_not() -> None:
    assert isinstance(expected_error(OSError(errno.ENOSPC, "No space left on device", "f")), DiskFullError)
    assert expected_error(OSError(errno.EACCES, "Permission denied", "f")) is None
