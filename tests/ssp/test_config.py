"""The config loader: types, unknown keys, overrides, round trip through TOML, and documented fields."""

import dataclasses
from pathlib import Path

import pytest

from ssp.config import ConfigError, field_docs, load_config, to_toml
from ssp.run_config import SSPConfig, check_sampling_matches_learner


def _all_config_classes(cls: type) -> list[type]:
    found = [cls]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            found += _all_config_classes(type(default))
    return found


def test_defaults_load_without_file() -> None:
    cfg = load_config(SSPConfig)
    assert cfg.retriever.topk == 3


def test_file_and_override_precedence(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[retriever]\ntopk = 5\nkind = "http"\n')
    cfg = load_config(SSPConfig, path, ["retriever.topk=7"])
    assert cfg.retriever.topk == 7 and cfg.retriever.kind == "http"


def test_unknown_key_names_path_and_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[retriever]\ntopkk = 5\n")
    with pytest.raises(ConfigError, match=r"c\.toml.*unknown key 'retriever\.topkk'.*known keys: kind"):
        load_config(SSPConfig, path)


def test_unknown_section_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown key 'retreiver'"):
        load_config(SSPConfig, None, ["retreiver.topk=3"])


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[retriever]\ntopk = "three"\n')
    with pytest.raises(ConfigError, match=r"c\.toml: 'retriever\.topk' must be an integer, got str 'three'"):
        load_config(SSPConfig, path)


def test_bool_is_not_an_int() -> None:
    with pytest.raises(ConfigError, match="'retriever.topk' must be an integer, got bool True"):
        load_config(SSPConfig, None, ["retriever.topk=true"])


def test_range_check_names_value_and_rule() -> None:
    with pytest.raises(ConfigError, match=r"\[retriever\] topk = 0: must be >= 1"):
        load_config(SSPConfig, None, ["retriever.topk=0"])


def test_malformed_override_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(SSPConfig, None, ["retriever.topk"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SSPConfig, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[retriever\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(SSPConfig, bad)


def test_bare_string_override() -> None:
    cfg = load_config(SSPConfig, None, ["retriever.url=http://10.0.0.1:8000"])
    assert cfg.retriever.url == "http://10.0.0.1:8000"


def test_toml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(SSPConfig, None, ["retriever.options={alpha = 1, name = 'x'}", "retriever.timeout_s=2"])
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(SSPConfig, path) == cfg


@pytest.mark.parametrize("cls", _all_config_classes(SSPConfig), ids=lambda c: c.__name__)
def test_every_config_field_is_documented(cls: type) -> None:
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__}: add a docstring under fields {missing}"


@pytest.mark.parametrize("cls", _all_config_classes(SSPConfig), ids=lambda c: c.__name__)
def test_config_classes_are_frozen_kw_only_slotted(cls: type) -> None:
    assert cls.__dataclass_params__.frozen, f"{cls.__name__} must be frozen"  # type: ignore[attr-defined]
    assert all(f.kw_only for f in dataclasses.fields(cls)), f"{cls.__name__} must be kw_only"
    assert "__slots__" in cls.__dict__, f"{cls.__name__} must be slotted"


def test_config_show_prints_documented_toml_that_loads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ssp.cli import main

    assert main(["config", "show", "--set", "retriever.topk=4"]) == 0
    out = capsys.readouterr().out
    assert "# Documents returned per search query" in out
    path = tmp_path / "shown.toml"
    path.write_text(out)
    assert load_config(SSPConfig, path).retriever.topk == 4


@pytest.mark.parametrize("config", sorted((Path(__file__).parents[2] / "configs").glob("*.toml")))
def test_shipped_configs_sample_as_their_learner_scores(config: Path) -> None:
    check_sampling_matches_learner(load_config(SSPConfig, config))


@pytest.mark.parametrize("overrides, match", [
    (["game.solver_temperature=0.8"], r"game\.solver_temperature = 0\.8, but learner\.logprob_temperature = 1"),
    (["game.proposer_temperature=0.7", "learner.logprob_temperature=0.7"],
     r"game\.solver_temperature = 1, but learner\.logprob_temperature = 0\.7"),
    (["game.top_p=0.9"], r"game\.top_p = 0\.9: .* set game\.top_p = 1\.0"),
])
def test_sampling_that_the_learner_cannot_score_is_refused(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_sampling_matches_learner(load_config(SSPConfig, None, overrides))


def test_only_trained_roles_are_bound_to_the_learner_temperature() -> None:
    cfg = load_config(SSPConfig, None, ['learner.train_roles=["solver"]', "game.proposer_temperature=0.8",
                                        "game.verifier_temperature=0.1"])
    check_sampling_matches_learner(cfg)


def test_training_commands_refuse_a_mismatched_config_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    from ssp.cli import main

    for command in (["learner", "train", "--trajectories", "tcp://127.0.0.1:1"], ["launch", "--dry-run"],
                    ["train"]):
        assert main([*command, "--set", "game.solver_temperature=0.5"]) == 2
        assert "game.solver_temperature = 0.5" in capsys.readouterr().err


def test_gpu_configs_make_the_same_reinforcement_learning_choices() -> None:
    """train-7b and train-32b score invalid questions, baseline the proposer and average the loss alike: a
    batch-mean baseline, so that an invalid question (reward 0) gets a negative advantage next to harder ones."""
    root = Path(__file__).parents[2] / "configs"
    chosen = [(c.game.invalid_reward, c.learner.proposer_baseline, c.learner.loss.aggregation,
               c.learner.solver_std_normalize, c.learner.drop_zero_variance_groups)
              for c in (load_config(SSPConfig, root / name) for name in ("train-7b.toml", "train-32b.toml"))]
    assert chosen[0] == chosen[1] == (0.0, "batch_mean", "token_mean", True, True)
