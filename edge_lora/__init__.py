"""edge_lora: trained PEFT LoRA adapter + base model -> small, fast, validated on-device artifacts."""

__version__ = "0.1.0"
