"""Hugging Face transformers model of GDN-2 language models.

`configuration_gdn2.py` and `modeling_gdn2.py` are self-contained (torch + transformers only): the
exporter copies them into every HF directory it writes, and `trust_remote_code=True` loads them from
there. In this package they can also be registered with the Auto classes, without remote code::

    from megatron_gdn2.hf import register_auto_classes
    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
"""
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_gdn2 import GDN2Config
from .modeling_gdn2 import GDN2Cache, GDN2ForCausalLM, GDN2Model

__all__ = ["GDN2Cache", "GDN2Config", "GDN2ForCausalLM", "GDN2Model", "MODEL_FILES", "register_auto_classes"]

# The files an exported directory carries so that it loads with trust_remote_code=True.
MODEL_FILES = tuple(Path(__file__).with_name(name) for name in ("configuration_gdn2.py", "modeling_gdn2.py"))
AUTO_MAP = {
    "AutoConfig": "configuration_gdn2.GDN2Config",
    "AutoModel": "modeling_gdn2.GDN2Model",
    "AutoModelForCausalLM": "modeling_gdn2.GDN2ForCausalLM",
}


def register_auto_classes() -> None:
    """Makes AutoConfig / AutoModel / AutoModelForCausalLM resolve model_type "gdn2" (idempotent)."""
    AutoConfig.register(GDN2Config.model_type, GDN2Config, exist_ok=True)
    AutoModel.register(GDN2Config, GDN2Model, exist_ok=True)
    AutoModelForCausalLM.register(GDN2Config, GDN2ForCausalLM, exist_ok=True)
