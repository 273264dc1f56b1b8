"""Base model resolution and the content hash that binds adapters and packages to a base."""

from __future__ import annotations

import pytest
import torch

from edge_lora.errors import ModelError
from edge_lora.base import base_content_hash, load_base, resolve_base, tiny_model


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_hash_of_folder_equals_hash_of_loaded_model(kind, tmp_path):
    model = tiny_model(kind)
    model.save_pretrained(tmp_path / kind)
    loaded, _ = load_base(tmp_path / kind)
    assert base_content_hash(tmp_path / kind) == base_content_hash(model) == base_content_hash(loaded)


def test_hash_changes_with_one_weight(tmp_path):
    model = tiny_model("llama")
    before = base_content_hash(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert base_content_hash(model) != before


def test_resolve_base_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve_base(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_base(tmp_path / "empty")
    with pytest.raises(ModelError, match="Unknown tiny model kind"):
        tiny_model("t5")
