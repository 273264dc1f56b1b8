"""The CLI as a user runs it: real exit codes, real files. ``run_cli`` starts a real subprocess (exit codes, no
traceback reaches the user); ``run_main`` calls the same entry point in this process, for the tests that run many
commands (each subprocess pays ~5 s of start-up: torch, transformers)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import ADAPTER_TABLE, make_peft_adapter
from edge_lora.base import tiny_model


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "edge_lora", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def run_main(capsys, *args):
    """``edge_lora.cli.main`` in process: its exit code and what it printed, shaped like ``run_cli``'s result."""
    from types import SimpleNamespace

    from edge_lora.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def test_help_lists_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    for verb in ("inspect", "models"):
        assert verb in out.stdout


def test_inspect_json_against_compatible_and_incompatible_base(tmp_path, capsys):
    kind, kwargs = ADAPTER_TABLE["llama-patterns-rslora"]
    make_peft_adapter(kind, kwargs, tmp_path / "adapter")
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    tiny_model("bert").save_pretrained(tmp_path / "bert")

    ok = run_main(capsys, "inspect", tmp_path / "adapter", "--base", tmp_path / "llama", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["compatible"] is True
    ranks = {m["name"]: m["rank"] for m in report["modules"]}
    assert ranks["model.layers.0.self_attn.q_proj"] == 6 and ranks["model.layers.0.mlp.down_proj"] == 2
    assert report["totals"]["params"] == sum(m["params"] for m in report["modules"])
    assert all(len(m["singular_values"]) == m["rank"] for m in report["modules"])

    bad = run_main(capsys, "inspect", tmp_path / "adapter", "--base", tmp_path / "bert", "--json")
    assert bad.returncode == 2
    assert any("not found in the base model" in p for p in json.loads(bad.stdout)["problems"])

    table = run_main(capsys, "inspect", tmp_path / "adapter", "--base", tmp_path / "bert")
    assert table.returncode == 2 and "NOT compatible" in table.stdout


def test_bad_adapter_path_is_a_clean_error(tmp_path):
    out = run_cli("inspect", tmp_path / "missing")
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------ no tracebacks
# Every mistake a user can make on the command line ends in one "error: ..." paragraph naming the file or key
# and the fix, with exit code 2 (3 for a missed budget), never in a Python traceback.
def assert_clean_error(out, *words, code=2):
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.startswith("error: "), out.stderr[-3000:]
    for word in words:
        assert word in out.stderr, (word, out.stderr)


@pytest.fixture
def tiny(tmp_path):
    """A tiny llama base (weights only, no tokenizer files) and a PEFT adapter for it."""
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, tmp_path / "adapter")
    tiny_model(kind).save_pretrained(tmp_path / "base")
    return tmp_path / "base", tmp_path / "adapter"


def with_tokenizer(base, folder):
    """A copy of ``base`` with a small word-level tokenizer saved beside its weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(120)} | {"[UNK]": 120}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    shutil.copytree(base, folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return folder


def test_bad_merge_compute_dtype_is_a_config_error(tiny, tmp_path):
    base, adapter = tiny
    out = run_cli("export", "--base", base, "--adapter", adapter, "--out", tmp_path / "out", "--quiet",
                  "--set", "merge.compute_dtype=float33")
    assert_clean_error(out, "merge.compute_dtype = 'float33'", "'float32', 'float64'")
    assert not (tmp_path / "out").exists()


def test_missing_calibration_text_names_the_file(tiny, tmp_path, capsys):
    base, adapter = tiny
    missing = tmp_path / "no-such-text.txt"
    out = run_main(capsys, "compress", adapter, "--out", tmp_path / "out",
                   "--calibrate", with_tokenizer(base, tmp_path / "b"), "--calibration-text", missing)
    assert_clean_error(out, f"--calibration-text {missing}", "no such file")
    assert not (tmp_path / "out").exists()


def test_a_dying_fresh_process_is_a_clear_error():
    """The profiler's memory-measuring child process crashing (here: a runner option it does not take) was a bare
    RuntimeError carrying the child's traceback."""
    from edge_lora.errors import EdgeLoraError
    from edge_lora.runtimes.timing import Variant, measure_isolated

    variant = Variant("v", "ort_cpu", "no-such-export", 1, options=(("no_such_option", 1),))
    plan = {"encoder": False, "prompts": {8: [1] * 8}, "lengths": [8]}
    with pytest.raises(EdgeLoraError) as err:
        measure_isolated(variant, 2, plan, None)
    msg = str(err.value)
    assert "measuring v (ort_cpu, no-such-export) in a fresh process failed" in msg and "no_such_option" in msg
    assert "--no-isolate" in msg and "Traceback" not in msg and err.value.exit_code == 2


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """(tiny base, a folder written by `compress --budget 0.3` for its adapter), made once for the module: each
    test damages its own copy."""
    root = tmp_path_factory.mktemp("compressed")
    kind, kwargs = ADAPTER_TABLE["llama-all7"]
    make_peft_adapter(kind, kwargs, root / "adapter")
    tiny_model(kind).save_pretrained(root / "base")
    done = run_cli("compress", root / "adapter", "--out", root / "c", "--budget", "0.3")
    assert done.returncode == 0, done.stderr
    return root / "base", root / "c"


def _damaged_header(src, dst, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src / "compressed.safetensors"), framework="pt") as f:
        header, tensors = json.loads(f.metadata()["edge_lora"]), {k: f.get_tensor(k) for k in f.keys()}
    edit(header)
    shutil.copytree(src, dst)
    save_file(tensors, str(dst / "compressed.safetensors"), metadata={"edge_lora": json.dumps(header)})
    return dst


def _drop_groups(h):
    del h["groups"]


def _ranks_str(h):
    h["groups"][0]["ranks"] = "big"


def _unknown_structure(h):
    h["groups"][0]["structure"] = "hosvd"


def _no_kind(h):
    del h["modules"][next(iter(h["modules"]))]["kind"]


def _misshapen(h):
    h["groups"][0]["ranks"]["d_in"] += 1


@pytest.mark.parametrize("edit, words", [
    (_drop_groups, ["header key groups is missing"]),
    (_ranks_str, ["header key groups[0].ranks is str 'big', not dict"]),
    (_unknown_structure, ["groups[0].structure is 'hosvd', not one of svd, shared-out"]),
    (_no_kind, ["header key modules['model.layers.0.", ".kind is missing"]),
    (_misshapen, ["do not chain to"]),
])
def test_malformed_compressed_header_is_an_adapter_error(compressed, tmp_path, edit, words):
    from edge_lora.adapter.compressed import CompressedAdapter
    from edge_lora.errors import AdapterError

    bad = _damaged_header(compressed[1], tmp_path / "bad", edit)
    with pytest.raises(AdapterError) as err:
        CompressedAdapter.load(bad)
    assert str(bad / "compressed.safetensors") in str(err.value) and "Compress the adapter again" in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_malformed_compressed_header_from_the_cli(compressed, tmp_path):
    base, folder = compressed
    bad = _damaged_header(folder, tmp_path / "bad", _ranks_str)
    out = run_cli("export", "--base", base, "--adapter", bad, "--out", tmp_path / "out", "--quiet")
    assert_clean_error(out, str(bad / "compressed.safetensors"), "groups[0].ranks", "Compress the adapter again")


def test_compress_out_is_refused_unless_force_and_written_whole(tiny, tmp_path, capsys):
    _, adapter = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    refused = run_main(capsys, "compress", adapter, "--out", out, "--budget", "0.3")
    assert_clean_error(refused, f"--out {out} already exists", "--force")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    ok = run_main(capsys, "compress", adapter, "--out", out, "--budget", "0.3", "--bits", "4", "--force")
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in out.iterdir()) == ["compressed.safetensors", "error_vs_bytes.png",
                                                     "quantized.safetensors", "report.json", "report.md",
                                                     "spectra.png"]
    # a run that fails (here: a budget no fit meets) leaves no folder behind, not half of one
    missed = run_main(capsys, "compress", adapter, "--out", tmp_path / "missed", "--budget", "0.001", "--structure",
                      "tucker2", "--max-rank", "1")
    assert_clean_error(missed, "budget", code=3)
    assert not (tmp_path / "missed").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_broken_tokenizer_files_are_an_error_not_random_ids(tiny, tmp_path, capsys):
    base, adapter = tiny
    broken = with_tokenizer(base, tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{not json")
    out = run_main(capsys, "export", "--base", broken, "--adapter", adapter, "--out", tmp_path / "out", "--quiet")
    assert_clean_error(out, f"the tokenizer in {broken}", "tokenizer.json", "does not load")
    out = run_main(capsys, "compress", adapter, "--out", tmp_path / "c", "--calibrate", broken)
    assert_clean_error(out, f"the tokenizer in {broken}")


def test_no_tokenizer_files_validates_on_fixed_ids_and_says_so(tiny, tmp_path, capsys):
    base, adapter = tiny
    out = run_main(capsys, "export", "--base", base, "--adapter", adapter, "--out", tmp_path / "out", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "fixed random token ids (seeded), not text, because the base has no tokenizer files" in (
        tmp_path / "out" / "report.md").read_text()
    # a damaged report.json of that folder: re-validating says which file and what to do
    (tmp_path / "out" / "report.json").write_text("{not json")
    again = run_main(capsys, "validate", tmp_path / "out", "--quiet")
    assert_clean_error(again, str(tmp_path / "out" / "report.json"), "re-export the folder, or delete")


def test_bad_profile_flag_is_a_usage_error():
    out = run_cli("profile", "somewhere", "--prompt-lengths", "16,abc")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "'16,abc' is not a comma-separated list of integers" in out.stderr


def test_compress_with_no_flags_allocates_by_output_error(tiny, tmp_path, capsys):
    """The default of `compress`: output-aware allocation on the base given by --calibrate; the folder it writes is
    one `export` takes (quantized.safetensors naming its source)."""
    base, adapter = tiny
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(" ".join(f"w{(7 * i + j) % 120}" for j in range(30)) for i in range(8)) + "\n")
    out = run_main(capsys, "compress", adapter, "--out", tmp_path / "c",
                   "--calibrate", with_tokenizer(base, tmp_path / "b"), "--calibration-text", text, "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["stage"] == "allocate"
    assert report["metrics"]["estimated_rel_error"] <= report["config"]["target_error"]
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(
        ["quantized.safetensors", "report.json", "report.md", "size_vs_error.png"])
    from edge_lora.adapter.load import load_adapter

    loaded, source = load_adapter(tmp_path / "c")
    assert source.resolve() == adapter.resolve() and loaded.bits_per_param() > 0


def test_compress_default_without_a_base_is_a_clear_error(tiny, tmp_path, capsys):
    _, adapter = tiny
    out = run_main(capsys, "compress", adapter, "--out", tmp_path / "c")
    assert_clean_error(out, "--calibrate BASE", "--budget")
    assert not (tmp_path / "c").exists()


def test_compress_refuses_two_modes_at_once(tiny, tmp_path, capsys):
    _, adapter = tiny
    out = run_main(capsys, "compress", adapter, "--out", tmp_path / "c", "--target-error", "0.1", "--budget", "0.2")
    assert_clean_error(out, "--target-error", "--budget", "one mode")
    assert not (tmp_path / "c").exists()


def test_compress_recover_distils_the_scales_and_reports_it(tiny, tmp_path, capsys):
    base, adapter = tiny
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(" ".join(f"w{(7 * i + j) % 120}" for j in range(60)) for i in range(24)) + "\n")
    out = run_main(capsys, "compress", adapter, "--out", tmp_path / "c",
                   "--calibrate", with_tokenizer(base, tmp_path / "b"), "--calibration-text", text,
                   "--target-error", "0.3", "--recover", "5")
    assert out.returncode == 0, out.stderr[-3000:]
    recovered = json.loads((tmp_path / "c" / "report.json").read_text())["recover"]
    assert recovered["metrics"]["steps"] == 5
    assert recovered["metrics"]["held_out_kl_after"] <= recovered["metrics"]["held_out_kl_before"]
    assert "Recovery (scale distillation)" in (tmp_path / "c" / "report.md").read_text()
    out = run_main(capsys, "compress", adapter, "--out", tmp_path / "d", "--bits", "4", "--recover", "5")
    assert_clean_error(out, "--recover", "--bits", "one mode")
    assert not (tmp_path / "d").exists()


def test_compress_complete_measures_on_the_adapters_own_answers(tiny, tmp_path, capsys):
    base, adapter = tiny
    base = with_tokenizer(base, tmp_path / "b")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(" ".join(f"w{(5 * i + j) % 120}" for j in range(12)) for i in range(40)) + "\n")
    out = run_main(capsys, "compress", adapter, "--out", tmp_path / "c", "--calibrate", base,
                   "--calibration-text", prompts, "--complete", "4")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert "completed by the adapter (≤ 4 tokens)" in report["metrics"]["calibration"]
    assert report["metrics"]["calibration_tokens"] > 40 * 12   # 12 one-token words a prompt: the answers count too
    out = run_main(capsys, "compress", adapter, "--out", tmp_path / "r", "--calibrate", base, "--recover", "2",
                   "--recover-text", prompts, "--complete", "4")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["metrics"]["calibration"].startswith("built-in")   # the allocation kept the built-in text
    assert report["recover"]["text"] == f"{prompts}, each line completed by the adapter (≤ 4 tokens)"
    # the flag errors, in process (they come before any model is loaded; the CLI turns them into exit 2)
    from edge_lora.config import AllocateConfig
    from edge_lora.errors import ConfigError
    from edge_lora.stages.allocate import allocate_folder

    d = tmp_path / "d"
    with pytest.raises(ConfigError, match="--complete .* --calibration-text FILE"):
        allocate_folder(adapter, d, AllocateConfig(target_error=0.01, complete_tokens=4), base=base)
    with pytest.raises(ConfigError, match="--recover-text .* needs --recover STEPS"):
        allocate_folder(adapter, d, AllocateConfig(target_error=0.01), base=base, recover_text=prompts)
    with pytest.raises(ConfigError, match="--recover-text .*missing.txt: no such file"):
        allocate_folder(adapter, d, AllocateConfig(target_error=0.01, recover_steps=2), base=base,
                        recover_text=tmp_path / "missing.txt")
    assert not d.exists()
