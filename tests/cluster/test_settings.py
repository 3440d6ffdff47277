"""cluster.settings: flags and TANDEM_* variables derived from a config dataclass's fields."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from cluster.settings import ConfigFlags


@dataclass(frozen=True)
class Inner:
    depth: int = field(default=4, metadata={"help": "how deep"})
    ratio: float | None = field(default=None, metadata={"help": "a ratio; unset: none"})


@dataclass(frozen=True)
class Sample:
    kind: str  # fixed by the program
    name: str = field(metadata={"help": "what it is called"})
    inner: Inner = field(default_factory=lambda: Inner(depth=6))
    count: int = field(default=3, metadata={"help": "how many"})
    limit: int | None = field(default=None, metadata={"help": "upper bound; unset: none"})
    rate: float = field(default=0.5, metadata={"help": "a 50% rate"})
    verbose: bool = field(default=False, metadata={"help": "talk more"})
    mode: Literal["fast", "slow"] = field(default="fast", metadata={"help": "how"})
    color: str = field(default="red", metadata={"help": "a color", "choices": ("red", "blue")})

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"count: must be >= 0, got {self.count}")


FLAGS = ConfigFlags(Sample, fixed=("kind",))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sample")
    FLAGS.add_to(parser)
    return parser


def build(argv: list[str], environ: dict[str, str] | None = None) -> Sample:
    return FLAGS.build(parser().parse_args(argv), environ=environ or {}, kind="k")


def test_every_type_from_flags() -> None:
    config = build(["--name", "x", "--count", "7", "--limit", "0", "--rate", "1.5",
                    "--verbose", "--mode", "slow", "--color", "blue", "--depth", "9",
                    "--ratio", "0.25"])
    assert config == Sample(kind="k", name="x", inner=Inner(depth=9, ratio=0.25), count=7,
                            limit=0, rate=1.5, verbose=True, mode="slow", color="blue")
    assert build(["--name", "x", "--no-verbose"]).verbose is False


def test_unset_stays_unset() -> None:
    config = build(["--name", "x"])
    assert config == Sample(kind="k", name="x")
    assert config.limit is None and config.inner.ratio is None
    assert config.inner.depth == 6  # the nested field's own default (its factory's)


def test_zero_is_a_value_not_a_default() -> None:
    assert build(["--name", "x", "--limit", "0"]).limit == 0
    assert build(["--name", "x"], {"TANDEM_LIMIT": "0"}).limit == 0


def test_variables_and_a_flag_wins() -> None:
    environ = {"TANDEM_NAME": "from-env", "TANDEM_COUNT": "5", "TANDEM_DEPTH": "2",
               "TANDEM_VERBOSE": "yes", "TANDEM_MODE": "slow", "TANDEM_RATIO": "0.5",
               "TANDEM_LIMIT": "12"}
    config = build([], environ)
    assert (config.name, config.count, config.inner.depth, config.verbose, config.mode,
            config.inner.ratio, config.limit) == ("from-env", 5, 2, True, "slow", 0.5, 12)
    config = build(["--count", "8", "--depth", "1", "--no-verbose", "--limit", "3"], environ)
    assert (config.name, config.count, config.inner.depth, config.verbose,
            config.limit) == ("from-env", 8, 1, False, 3)
    assert build(["--name", "x"], {"TANDEM_VERBOSE": "OFF"}).verbose is False


@pytest.mark.parametrize(("variable", "text"), [
    ("TANDEM_COUNT", "many"), ("TANDEM_RATE", "fast"), ("TANDEM_VERBOSE", "maybe"),
    ("TANDEM_MODE", "medium"), ("TANDEM_COLOR", "green"), ("TANDEM_DEPTH", "1.5"),
    ("TANDEM_LIMIT", ""),
])
def test_a_malformed_variable_is_an_error_naming_it(variable: str, text: str) -> None:
    with pytest.raises(ValueError, match=variable):
        build(["--name", "x"], {variable: text})


def test_a_malformed_variable_is_ignored_when_its_flag_is_given() -> None:
    assert build(["--name", "x", "--count", "2"], {"TANDEM_COUNT": "many"}).count == 2


def test_malformed_flags_are_refused_by_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--count", "many"], ["--mode", "medium"], ["--color", "green"]):
        with pytest.raises(SystemExit) as exc:
            parser().parse_args(argv)
        assert exc.value.code == 2
        assert argv[0] in capsys.readouterr().err


def test_a_required_field_must_be_given(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"name: --name \(or TANDEM_NAME\) is required"):
        build([])
    assert build([], {"TANDEM_NAME": "y"}).name == "y"
    monkeypatch.delenv("TANDEM_NAME", raising=False)
    with pytest.raises(SystemExit) as exc:  # parse: the program's usage error, exit status 2
        FLAGS.parse(parser(), [], kind="k")
    assert exc.value.code == 2
    assert "sample: error: name: --name (or TANDEM_NAME) is required" in capsys.readouterr().err


def test_parse_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TANDEM_NAME", "env-name")
    monkeypatch.setenv("TANDEM_COUNT", "-1")
    with pytest.raises(SystemExit):  # the dataclass's own validation, as a usage error
        FLAGS.parse(parser(), [], kind="k")
    assert "count: must be >= 0, got -1" in capsys.readouterr().err
    config = FLAGS.parse(parser(), ["--count", "1"], kind="k")
    assert (config.name, config.count) == ("env-name", 1)


def test_help_shows_every_flag_with_its_help_default_and_variable() -> None:
    text = " ".join(parser().format_help().split())  # argparse wraps lines
    for setting in FLAGS.settings:
        assert setting.flag in text and setting.env in text and setting.help in text
    assert "how many (default: 3; env TANDEM_COUNT)" in text
    assert "what it is called (required; env TANDEM_NAME)" in text
    assert "upper bound; unset: none (default: unset; env TANDEM_LIMIT)" in text
    assert "a 50% rate (default: 0.5; env TANDEM_RATE)" in text
    assert "how deep (default: 6; env TANDEM_DEPTH)" in text
    assert "--verbose, --no-verbose talk more (default: off; env TANDEM_VERBOSE)" in text
    assert "{fast,slow}" in text and "{red,blue}" in text


def test_nested_config_is_flattened_once() -> None:
    flags = [s.flag for s in FLAGS.settings]
    assert "--depth" in flags and "--ratio" in flags
    assert not [f for f in flags if "inner" in f or "kind" in f]
    assert len(flags) == len(set(flags))
    assert "inner:" in parser().format_help()  # the nested fields' argument group


@dataclass(frozen=True)
class NoHelp:
    size: int = 1


@dataclass(frozen=True)
class Clash:
    inner: Inner = field(default_factory=Inner)
    depth: int = field(default=1, metadata={"help": "also depth"})


@dataclass(frozen=True)
class Unsupported:
    sizes: list[int] = field(default_factory=list, metadata={"help": "sizes"})


def test_badly_declared_configs_are_refused() -> None:
    with pytest.raises(TypeError, match=r"NoHelp.size: no help"):
        ConfigFlags(NoHelp)
    with pytest.raises(TypeError, match="repeat: \\['depth'\\]"):
        ConfigFlags(Clash)
    with pytest.raises(TypeError, match="Unsupported.sizes: unsupported type"):
        ConfigFlags(Unsupported)
    with pytest.raises(TypeError, match=r"no fields \['kin'\] to fix"):
        ConfigFlags(Sample, fixed=("kin",))
    with pytest.raises(TypeError, match="fixed fields"):
        FLAGS.build(parser().parse_args(["--name", "x"]), environ={})


@dataclass(frozen=True)
class Leaf:
    cost: float = field(default=1.0, metadata={"help": "a cost"})
    other: float = field(default=2.0, metadata={"help": "another cost"})


@dataclass(frozen=True)
class Middle:
    leaf: Leaf = field(default_factory=Leaf)
    size: int = field(default=8, metadata={"help": "a size"})


@dataclass(frozen=True)
class Outer:
    middle: Middle = field(default_factory=lambda: Middle(size=16))


def test_a_config_two_levels_down_takes_its_flags() -> None:
    """As the sim cost model inside the engine config inside a worker's (--sim-step-s)."""
    flags = ConfigFlags(Outer)
    parser = argparse.ArgumentParser(prog="outer")
    flags.add_to(parser)
    config = flags.build(parser.parse_args(["--cost", "0"]), environ={})
    assert config == Outer(Middle(Leaf(cost=0.0), size=16))
    config = flags.build(parser.parse_args([]), environ={"TANDEM_OTHER": "3"})
    assert config == Outer(Middle(Leaf(other=3.0), size=16))
