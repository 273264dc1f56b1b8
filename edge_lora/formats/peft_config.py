"""PEFT's adapter_config.json as PEFT itself reads it, for LoRA: which keys change what the saved tensors mean,
which values PEFT refuses or re-interprets at load, and which modules it attaches a LoRA layer to.

    check_lora_config(config, "adapter/adapter_config.json", AdapterError)   # raises, naming the key
    targeted(config, "model.layers.0.self_attn.q_proj")                       # PEFT's target matching

Shared by the import (``edge_lora.adapter.peft``) and the strict OTA reader (``edge_lora.ota.adapter_check``),
so that what the packager ships, what the device installs and what the export computes are read alike. json and
re only: the device runs it without torch or PEFT. Rules checked against PEFT 0.21 (tests/test_peft_config.py
loads each case in PEFT and compares).
"""

from __future__ import annotations

import math
import re

# PEFT features that change what the saved tensors mean or how the module runs. Reading such an adapter as plain
# LoRA would give silently wrong outputs, so each is refused with the reason (DoRA: see ``use_dora`` below).
UNSUPPORTED = {
    "target_parameters": "LoRA on raw nn.Parameters (MoE experts) is not supported yet",
    "layer_replication": "layer replication changes the base model's layer layout",
    "alora_invocation_tokens": "activated LoRA (aLoRA) switches on at invocation tokens; export supports "
                               "always-on LoRA only",
    "trainable_token_indices": "trainable tokens are a sparse embedding update, not LoRA",
    "use_qalora": "QA-LoRA pools inputs group-wise before lora_A",
    "use_bdlora": "block-diagonal LoRA factors are not plain A/B matrices",
    "arrow_config": "Arrow routing mixes several adapters per token",
    "monteclora_config": "MonteCLoRA samples its factors at run time",
    "velora_config": "VeLoRA changes the layer's forward pass",
    "kasa_config": "KaSA adds a singular-value module to the layer",
}
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# initialisations that PEFT re-runs when it loads a saved adapter and that rewrite the base weights (PiSSA, OLoRA,
# CorDA, LoftQ, ...): only these leave the base as it is
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")   # eva: at load PEFT only zeroes lora_B
BIASES = ("none", "all", "lora_only")
# keys PEFT writes that say nothing about the tensors (or only configure an initialisation that is not used)
INFORMATIONAL = {"peft_type", "peft_version", "base_model_name_or_path", "revision", "auto_mapping", "inference_mode",
                 "task_type", "megatron_core", "megatron_config", "loftq_config", "eva_config", "corda_config",
                 "lora_ga_config", "runtime_config", "qalora_group_size", "ensure_weight_tying"}
CHECKED = {"r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "lora_dropout",
           "fan_in_fan_out", "bias", "use_rslora", "use_dora", "lora_bias", "init_lora_weights", "modules_to_save",
           "layers_to_transform", "layers_pattern"}


def _off(value) -> bool:
    """The value a PEFT feature key holds when the feature is not used."""
    return value is None or value is False or value in ({}, [], "") or (type(value) in (int, float) and value == 0)


def _names(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, str) and t for t in value)


def check_lora_config(config, where: str, error: type[Exception]) -> dict:
    """Raise ``error`` naming ``where`` and the key, or return ``config``. Refused: what PEFT refuses at load
    (an unknown bias, task type or initialisation, a dropout outside [0, 1]), what it re-interprets (an
    initialisation that rewrites the base, a truthy non-boolean flag), the features in ``UNSUPPORTED``,
    and keys this table does not know unless they hold an
    "off" value (null, false, empty): a newer PEFT writes its new features switched off."""
    def bad(key, why):
        return error(f"{where}: {key} {why}")

    if not isinstance(config, dict) or config.get("peft_type") != "LORA":   # PEFT's lookup is case-sensitive
        raise error(f"{where}: peft_type is {config.get('peft_type') if isinstance(config, dict) else None!r}; it "
                    "must be 'LORA' (edge_lora reads LoRA adapters only).")
    r = config.get("r", 8)
    if type(r) is not int or r < 1:
        raise bad("r", f"must be a positive integer, not {r!r}.")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise bad("lora_alpha", f"must be a positive number, not {alpha!r}.")
    targets = config.get("target_modules")
    if not ((isinstance(targets, str) and targets) or _names(targets)):
        raise bad("target_modules", f"must be a module name pattern or a non-empty list of names, not {targets!r}.")
    excluded = config.get("exclude_modules")
    if not (excluded is None or isinstance(excluded, str) or _names(excluded) or excluded == []):
        raise bad("exclude_modules", f"must be a pattern or a list of names, not {excluded!r}.")
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), str) and config[key]:
            _pattern(config[key], key, bad)
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise bad(key, f"must be an object, not {value!r}.")
        for pat, v in value.items():
            _pattern(pat, f"{key} key", bad)
            if key == "rank_pattern" and (type(v) is not int or v < 1):
                raise bad(f"rank_pattern[{pat!r}]", f"must be a positive integer, not {v!r}.")
            if key == "alpha_pattern" and (isinstance(v, bool) or not isinstance(v, (int, float))
                                           or not math.isfinite(v) or v <= 0):
                raise bad(f"alpha_pattern[{pat!r}]", f"must be a positive number, not {v!r}.")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        raise bad("lora_dropout", f"must be a probability in [0, 1] (PEFT refuses anything else), not {dropout!r}.")
    for key in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "inference_mode", "ensure_weight_tying"):
        if key in config and type(config[key]) is not bool:
            raise bad(key, f"must be true or false, not {config[key]!r} (PEFT reads any non-empty value as true).")
    if config.get("bias", "none") not in BIASES:
        raise bad("bias", f"is {config['bias']!r}; PEFT knows {', '.join(BIASES)}.")
    task = config.get("task_type")
    if task is not None and task not in TASK_TYPES:
        raise bad("task_type", f"is {task!r}; PEFT knows {', '.join(TASK_TYPES)} (or null).")
    init = config.get("init_lora_weights", True)
    init = init.lower() if isinstance(init, str) else init   # PEFT compares lower-cased
    if not any(init is v or (isinstance(v, str) and init == v) for v in PLAIN_INITS):
        raise bad("init_lora_weights", f"is {init!r}: PEFT re-runs that initialisation when it loads the adapter "
                  "and rewrites the base weights (or does not know it). Convert the adapter to plain LoRA first "
                  "(PEFT's path_initial_model_for_weight_conversion) and set init_lora_weights to true.")
    saved = config.get("modules_to_save")
    if not (saved is None or saved == [] or _names(saved)):
        raise bad("modules_to_save", f"must be a list of module names, not {saved!r}.")
    layers = config.get("layers_to_transform")
    if not (layers is None or type(layers) is int or (isinstance(layers, list)
                                                      and all(type(i) is int for i in layers))):
        raise bad("layers_to_transform", f"must be a layer index or a list of them, not {layers!r}.")
    pattern = config.get("layers_pattern")
    if not (pattern is None or isinstance(pattern, str) or (isinstance(pattern, list)
                                                            and all(isinstance(p, str) for p in pattern))):
        raise bad("layers_pattern", f"must be a name or a list of names, not {pattern!r}.")
    # cross-field rules of LoraConfig.__post_init__ and the initialisers (PEFT refuses these at load)
    if isinstance(targets, str) and not (layers is None or layers == []):
        raise bad("layers_to_transform", "cannot be combined with a regex target_modules (PEFT refuses it).")
    if pattern and (layers is None or layers == []):
        raise bad("layers_pattern", "needs layers_to_transform (PEFT refuses it alone).")
    if isinstance(pattern, str):
        _pattern(pattern, "layers_pattern", bad)
    for p in pattern if isinstance(pattern, list) else []:
        _pattern(p, "layers_pattern", bad)
    for m in saved or []:
        _pattern(m, "modules_to_save", bad)
    if init == "orthogonal" and any(v % 2 for v in [r, *(config.get("rank_pattern") or {}).values()]):
        raise bad("init_lora_weights", "'orthogonal' needs even ranks (PEFT refuses odd ones at load).")
    if config.get("lora_bias") and init not in (True, False):
        raise bad("lora_bias", f"cannot be combined with init_lora_weights {init!r} (PEFT refuses it).")
    for key, why in UNSUPPORTED.items():
        if not _off(config.get(key)):
            raise bad(key, f"is set ({config[key]!r}), and {why}. Retrain without it, or merge it in PEFT and use "
                      "the merged model as the base.")
    for key, value in config.items():
        if key not in CHECKED and key not in INFORMATIONAL and key not in UNSUPPORTED and not _off(value):
            raise bad(key, f"is {value!r}, and this edge_lora does not know what PEFT does with it. If it holds "
                      "PEFT's default, remove it; otherwise update edge_lora.")
    return config


def _pattern(pattern: str, key: str, bad) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise bad(key, f"{pattern!r} is not a valid pattern ({exc}).") from None


def pattern_key(keys, module: str) -> str | None:
    """PEFT's rule for rank_pattern / alpha_pattern: the first key (a regex) that matches a dotted suffix of the
    module name, ``re.match(rf"(.*\\.)?({key})$", module)``."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def targeted(config: dict, module: str) -> bool:
    """Whether PEFT attaches a LoRA layer to ``module`` (the name inside the base model, e.g.
    ``model.layers.0.self_attn.q_proj``): peft.tuners.tuners_utils.check_target_module_exists, for LoRA."""
    saved = config.get("modules_to_save") or []
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in saved):   # PEFT never adapts a saved module
        return False
    excluded = config.get("exclude_modules")
    if excluded:
        if isinstance(excluded, str):
            if re.fullmatch(excluded, module):
                return False
        elif module in excluded or any(module.endswith(f".{e}") for e in excluded):
            return False
    targets = config["target_modules"]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        # PEFT expands it to every Linear / Conv1D but the output layer (check_modules refuses embeddings)
        return module.rsplit(".", 1)[-1] != "lm_head"
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    pattern = config.get("layers_pattern")
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        match = None
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match["idx"])
    return index == layers if isinstance(layers, int) else index in layers


def check_modules(config: dict, modules: dict[str, set[str]], where: str, error: type[Exception]) -> None:
    """``modules``: module name → the parts its tensors hold ('lora_B.bias', 'magnitude', ...). Refused: a module
    PEFT would not attach a layer to (it drops the tensors), a ``lora_B.bias`` without ``lora_bias`` (dropped) or
    missing with it (PEFT initialises one), DoRA magnitudes that ``use_dora`` contradicts."""
    all_linear = isinstance(config["target_modules"], str) and config["target_modules"].lower() == "all-linear"
    for name, parts in sorted(modules.items()):
        if all_linear and "lora_embedding_A" in parts:
            raise error(f"{where}: module {name!r} is an embedding LoRA, but target_modules 'all-linear' selects "
                        "Linear layers only; PEFT would drop it.")
        if not targeted(config, name):
            raise error(f"{where}: module {name!r} has LoRA tensors, but target_modules / exclude_modules / "
                        "layers_to_transform do not select it; PEFT would drop them. The config and the weights "
                        "are from different runs.")
        has_bias = "lora_B.bias" in parts
        if has_bias != bool(config.get("lora_bias", False)) and "lora_embedding_A" not in parts:
            raise error(f"{where}: module {name!r} {'has' if has_bias else 'lacks'} a lora_B.bias tensor, but "
                        f"lora_bias is {bool(config.get('lora_bias', False))}; PEFT would "
                        f"{'drop it' if has_bias else 'initialise one'}.")
        has_magnitude = "magnitude" in parts
        if has_magnitude != bool(config.get("use_dora", False)):
            raise error(f"{where}: module {name!r} {'has' if has_magnitude else 'lacks'} a DoRA magnitude "
                        f"(lora_magnitude_vector), but use_dora is {bool(config.get('use_dora', False))}.")
