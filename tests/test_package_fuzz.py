"""Fuzzing the package reader and installer: random bytes, mutated packages, and re-signed packages with
mutated manifests and entries never raise anything but a PackageError, and never change the install root unless
the result is a valid package that installs completely."""
# ruff: noqa: F811 (fixtures imported from package_fixtures are used as same-named arguments)

from __future__ import annotations

import collections
import copy
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from package_fixtures import ota, resign, snapshot  # noqa: F401 (fixtures)

from edge_lora.errors import PackageError
from edge_lora.ota.container import MAGIC, Limits, read_container
from edge_lora.ota.install import check_installed, install

# EDGE_LORA_FUZZ_SCALE=20 runs 20x the examples with a random seed and prints the outcome counts.
SCALE = float(os.environ.get("EDGE_LORA_FUZZ_SCALE", "1"))
SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture,
                                                      HealthCheck.too_slow, HealthCheck.data_too_large],
                "derandomize": SCALE == 1}
OUTCOMES: collections.Counter = collections.Counter()
LIMITS = Limits(max_entry_bytes=1 << 20, max_total_bytes=2 << 20, max_package_bytes=4 << 20)


class _Env(dict):
    def __repr__(self):  # hypothesis prints the arguments of a failing example; keep it short
        return "<fuzz env>"


@pytest.fixture(scope="module")
def env(ota, tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    template = base / "template"
    template.mkdir()
    install(ota.v1, ota.pub, template, base=ota.base_hash)
    root = base / "root"
    shutil.copytree(template, root)
    yield _Env(template=template, root=root, snap=snapshot(template),
               packages=[ota.v2.read_bytes(), ota.v2d.read_bytes()], pub=ota.pub, priv=ota.priv)
    if SCALE != 1:
        print("\nfuzz outcomes:", dict(OUTCOMES))


def attempt(env, data: bytes, may_succeed: bool = False) -> str:
    root = env["root"]
    try:
        install(data, env["pub"], root, limits=LIMITS)
    except PackageError as exc:
        OUTCOMES[type(exc).__name__] += 1
        assert snapshot(root) == env["snap"], "a refused package changed the install root"
        return "refused"
    OUTCOMES["installed"] += 1
    assert may_succeed, "a corrupted package was installed"
    assert check_installed(root, "tiny-ota") == 2  # a complete, hash-clean version
    shutil.rmtree(root)
    shutil.copytree(env["template"], root)
    return "installed"


@settings(max_examples=int(150 * SCALE), **SETTINGS)
@given(st.one_of(st.binary(max_size=2048),
                 st.binary(max_size=2048).map(lambda b: MAGIC + b"\x00\x01" + b)))
def test_random_bytes(env, data):
    attempt(env, data)


_mutation = st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate", "overwrite"]),
                      st.floats(0, 1, exclude_max=True), st.integers(1, 255), st.binary(min_size=1, max_size=9))


@settings(max_examples=int(250 * SCALE), **SETTINGS)
@given(which=st.integers(0, 1), mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_packages(env, which, mutations):
    data = bytearray(env["packages"][which])
    original = bytes(data)
    for op, where, xor, blob in mutations:
        i = int(where * len(data)) if data else 0
        if op == "flip" and data:
            data[i] ^= xor
        elif op == "insert":
            data[i:i] = blob
        elif op == "delete" and data:
            del data[i:i + len(blob)]
        elif op == "truncate":
            del data[i:]
        elif op == "overwrite":
            data[i:i + len(blob)] = blob
    if bytes(data) == original:
        return
    attempt(env, bytes(data))


# -------------------------------------------------------------- structured: valid signature, bad contents
_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70)
                     | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
                     | st.sampled_from(["../x", "/abs", "zstd", "copy-ops", "a" * 64]),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3),
                     max_leaves=6)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:6]):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=int(200 * SCALE), **SETTINGS)
@given(data=st.data())
def test_resigned_mutated_manifests(env, data):
    which = data.draw(st.integers(0, 1))
    pkg = env["packages"][which]
    raw = read_container(pkg, Limits())
    manifest = json.loads(raw.manifest_bytes)
    paths = [p for p in _paths(manifest) if p]
    n = data.draw(st.integers(1, 3))
    m = copy.deepcopy(manifest)
    for _ in range(n):
        path = data.draw(st.sampled_from(paths))
        parent = m
        try:
            for k in path[:-1]:
                parent = parent[k]
            op = data.draw(st.sampled_from(["replace", "delete", "duplicate"]))
            if op == "replace":
                parent[path[-1]] = data.draw(_json)
            elif op == "delete":
                del parent[path[-1]]
            elif isinstance(parent, list):
                parent.append(copy.deepcopy(parent[path[-1]]))
        except (KeyError, IndexError, TypeError):
            continue  # the path went away through an earlier mutation
    entry_op = data.draw(st.sampled_from(["keep", "type", "swap", "drop", "rename"]))

    def mutate_entries(es):
        if entry_op == "type":
            return [(nm, d, 1) for nm, d, _ in es]
        if entry_op == "swap" and len(es) > 1:
            return list(reversed(es))
        if entry_op == "drop":
            return es[:-1]
        if entry_op == "rename":
            return [(nm + "x", d, t) for nm, d, t in es]
        return es

    attempt(env, resign(pkg, env["priv"], lambda _: m, mutate_entries), may_succeed=True)


# ----------------------------------------------------------------- the strict adapter reader (ota/adapter_check)
def _adapter_files():
    import numpy as np
    from safetensors.numpy import save

    tensors = {"base_model.model.layers.0.q.lora_A.weight": np.arange(8, dtype=np.float32).reshape(2, 4) / 10,
               "base_model.model.layers.0.q.lora_B.weight": np.ones((3, 2), dtype=np.float32),
               "base_model.model.layers.0.q.lora_B.bias": np.zeros(3, dtype=np.float16)}
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"],
              "lora_bias": True}
    return save(tensors), json.dumps(config).encode()


def _reader_accepts_only_what_safetensors_reads_the_same(data: bytes, config: bytes) -> str:
    from safetensors.numpy import load

    from edge_lora.ota.adapter_check import check_adapter, strict_layout

    files = {"adapter_model.safetensors": data, "adapter_config.json": config}
    try:
        check_adapter(files)
    except PackageError:
        return "refused"
    layout = strict_layout(data)
    loaded = load(data)   # accepted: the reference reader must load it, to the same names and shapes
    assert {k: tuple(v.shape) for k, v in loaded.items()} == {k: v[1] for k, v in layout.items()}
    return "accepted"


def _mutations(draw_bytes):
    return st.one_of(
        st.binary(max_size=64).map(lambda junk: ("append", junk)),
        st.tuples(st.integers(0, 400), st.integers(0, 255)).map(lambda t: ("flip", t)),
        st.tuples(st.integers(0, 400), st.integers(0, 40)).map(lambda t: ("cut", t)),
        st.sampled_from(['"F32"', '"F16"', '"Q4"', '"BOOL"', '[2, 4]', '[4, 2]', '[0, 32]', '[32, 64]', "[]"])
        .flatmap(lambda s: st.integers(0, 300).map(lambda i: ("splice", (i, s)))))


def _apply(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    if kind == "append":
        return data + arg
    if kind == "flip":
        i, b = arg
        return data[:i % len(data)] + bytes([b]) + data[i % len(data) + 1:]
    if kind == "cut":
        i, n = arg
        return data[:i % len(data)] + data[i % len(data) + n:]
    i, text = arg
    n = int.from_bytes(data[:8], "little")
    head = data[8:8 + n].decode("utf-8", "replace")
    j = 8 + (i % max(n, 1))
    return data[:8] + (head[:j - 8] + text + head[j - 8:]).encode()[:n] + data[8 + n:]


def _fuzz_reader(n: int):
    data0, config0 = _adapter_files()

    @settings(max_examples=n, **SETTINGS)
    @given(st.lists(_mutations(None), min_size=1, max_size=3),
           st.sampled_from([{}, {"r": 3}, {"r": 0}, {"target_modules": 5}, {"lora_alpha": "x"},
                            {"rank_pattern": {"(": 2}}, {"peft_type": "IA3"}]))
    def run(mutations, config_change):
        data = data0
        for m in mutations:
            data = _apply(data, m)
        config = json.dumps({**json.loads(config0), **config_change}).encode()
        OUTCOMES[_reader_accepts_only_what_safetensors_reads_the_same(data, config)] += 1

    run()


def test_strict_adapter_reader_fuzz():
    """A few thousand mutated adapters: the reader raises nothing but a PackageError, and whatever it accepts
    the safetensors library loads to the same tensors."""
    _fuzz_reader(int(3000 * SCALE))
    assert _reader_accepts_only_what_safetensors_reads_the_same(*_adapter_files()) == "accepted"


@pytest.mark.slow
def test_strict_adapter_reader_fuzz_100k():
    _fuzz_reader(100_000)
