"""Profiles: the shipped files parse; unknown keys, bad values and bad overrides are ProfileErrors that say
what is valid."""

from __future__ import annotations

import pytest

from edge_lora.errors import ProfileError
from edge_lora.config import (
    ExportConfig,
    MergeConfig,
    ValidateConfig,
    available_profiles,
    load_profile,
    parse_overrides,
    parse_profile,
)


def test_shipped_profiles_parse_and_open_with_their_command():
    assert {"cpu-fp32", "cpu-hotswap"} <= set(available_profiles())
    merged = load_profile("cpu-fp32")
    assert merged.stages == ("merge", "export", "validate")
    assert isinstance(merged.config("merge"), MergeConfig) and merged.config("export").mode == "merged"
    hotswap = load_profile("cpu-hotswap")
    assert hotswap.config("export").mode == "hotswap" and "merge" not in hotswap.stages
    for profile in (merged, hotswap):
        first = open(profile.source).readline()
        assert first.startswith("# python -m edge_lora export") and f"--profile {profile.name}" in first


def test_profile_by_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[profile]\nstages = ["merge", "export"]\n[validate]\nmax_mean_kl = 1\n')
    profile = load_profile(path)
    assert profile.name == "mine" and profile.config("validate").max_mean_kl == 1.0


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ProfileError, match=r"unknown key\(s\) min_top_1.*Valid keys: eval_tokens"):
        parse_profile({"validate": {"min_top_1": 0.9}}, "x")


def test_unknown_table_and_stage():
    with pytest.raises(ProfileError, match="unknown table"):
        parse_profile({"quantise": {}}, "x")
    with pytest.raises(ProfileError, match="unknown stage"):
        parse_profile({"profile": {"stages": ["merge", "exprot"]}}, "x")


@pytest.mark.parametrize("table, match", [
    ({"export": {"mode": "fused"}}, "export.mode"),
    ({"validate": {"eval_tokens": "many"}}, "validate.eval_tokens must be int"),
    ({"merge": {"check_finite": 1}}, "merge.check_finite must be bool"),
    ({"profile": {"stages": ["export"]}}, "'merge' is not in"),
    ({"profile": {"stages": ["merge", "export"]}, "export": {"mode": "hotswap"}}, "remove it"),
])
def test_bad_values(table, match):
    with pytest.raises(ProfileError, match=match):
        parse_profile(table, "x")


def test_overrides_are_typed_by_the_field():
    out = parse_overrides(["validate.max_mean_kl=1e-3", "validate.task_examples=8", "merge.check_finite=false",
                           "export.mode=hotswap", "export.hotswap_targets=a.q_proj,a.v_proj"])
    assert out == {"validate": {"max_mean_kl": 1e-3, "task_examples": 8}, "merge": {"check_finite": False},
                   "export": {"mode": "hotswap", "hotswap_targets": ["a.q_proj", "a.v_proj"]}}
    profile = load_profile("cpu-fp32", ["validate.task_examples=8"])
    assert profile.config("validate").task_examples == 8


def test_optional_fields_take_a_value_or_none():
    """``int | None`` fields: a value of the member type (from TOML or --set), or none."""
    assert parse_overrides(["quantize.lm_head_block_size=128"]) == {"quantize": {"lm_head_block_size": 128}}
    assert parse_overrides(["quantize.lm_head_block_size=none"]) == {"quantize": {"lm_head_block_size": None}}
    profile = load_profile("cpu-int8", ["quantize.lm_head_block_size=64"])
    assert profile.config("quantize").lm_head_block_size == 64
    with pytest.raises(ProfileError, match="lm_head_block_size must be int"):
        parse_profile({"quantize": {"lm_head_block_size": "64"}}, "x")


@pytest.mark.parametrize("item, match", [
    ("validate.max_mean_kl", "expected stage.key=value"),
    ("validat.max_mean_kl=1", "unknown stage"),
    ("validate.max_kl=1", "Valid keys"),
    ("validate.task_examples=lots", "not a valid int"),
    ("quantize.lm_head_block_size=lots", "not a valid int"),
])
def test_bad_overrides(item, match):
    with pytest.raises(ProfileError, match=match):
        parse_overrides([item])


def test_unknown_profile_name_lists_available():
    with pytest.raises(ProfileError, match="Available: .*cpu-fp32"):
        load_profile("no-such-profile")


def test_defaults_are_valid():
    ExportConfig(), ValidateConfig(), MergeConfig()


@pytest.mark.parametrize("stages, match", [
    ([], "stages is empty"),
    (["merge", "merge", "export"], r"\['merge'\] appear more than once"),
    (["merge", "validate", "export"], "out of order"),
])
def test_stage_lists_that_cannot_mean_what_they_say(stages, match):
    with pytest.raises(ProfileError, match=match):
        parse_profile({"profile": {"stages": stages}}, "t", None, [])
