"""``lit_saferlhf.errors``: messages, where a setting's key is found, what counts as ours."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from jsonargparse import Namespace

from lit_saferlhf.data.records import BadRecordError
from lit_saferlhf.errors import (
    CommandParser,
    ConfigError,
    DataError,
    DiskFullError,
    MissingTensorError,
    ModelDirError,
    ModelLayoutError,
    UsageError,
    chain,
    expected_error,
    locate,
    output_dir,
    require,
    writing,
)
from lit_saferlhf.models.causal_lm import staged_dir

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


def test_a_missing_tensor_is_a_key_error_with_a_plain_message() -> None:
    error = MissingTensorError("/m: the checkpoint has no ['score.weight']")
    assert isinstance(error, KeyError)
    assert isinstance(error, ModelLayoutError)  # and so a ValueError
    assert str(error) == "/m: the checkpoint has no ['score.weight']"  # not KeyError's quoted repr


def test_command_parser_errors_are_usage_errors() -> None:
    parser = CommandParser(prog="lit-saferlhf world")
    parser.add_argument("--seed", type=int)
    with pytest.raises(UsageError, match=r"^lit-saferlhf world: argument --seed: invalid int value: 'x' \(`"):
        parser.parse_args(["--seed", "x"])


def test_a_library_error_naming_no_space_is_a_full_disk_of_the_path() -> None:
    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    with (
        pytest.raises(DiskFullError, match=r"^disk full while writing out/model \(.*\(os error 28\)\)$"),
        writing("out/model"),
    ):
        raise rust
    with pytest.raises(ValueError, match="a bug"), writing("out/model"):  # anything else passes unchanged
        raise ValueError("a bug")


def test_output_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert output_dir(tmp_path / "a" / "b", "--out").is_dir()
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"^--out: a dir that can be created .*'.*/f/x' \(Not a directory\)$"):
        output_dir(tmp_path / "f" / "x", "--out")

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "mkdir", full)
    with pytest.raises(DiskFullError, match="disk full while writing"):
        output_dir(tmp_path / "c", "--out")


def test_a_failed_export_leaves_no_staging_dir_and_the_old_export(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with staged_dir(out) as staging:
        (staging / "weights").write_text("old")

    def half_written() -> None:
        with staged_dir(out) as staging:
            (staging / "weights").write_text("half")
            raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        half_written()
    assert [path.name for path in tmp_path.iterdir()] == ["model"]
    assert (out / "weights").read_text() == "old"
