"""The adapter side: PEFT import/export (``peft``), the compressed format (``compressed``), inspection.

The names most callers need are re-exported here: ``from edge_lora.adapter import load_peft, Adapter``.
"""

from edge_lora.adapter.peft import (  # noqa: F401
    CONFIG_NAME,
    PEFT_PREFIX,
    WEIGHTS_NAME,
    Adapter,
    LoraModule,
    base_layer_shape,
    check_compatible,
    compatibility_problems,
    load_peft,
    lora_scale,
    peft_config_for,
    peft_state_dict,
    rank_and_alpha,
    save_peft,
)
