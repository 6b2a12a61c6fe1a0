"""Options shared by the two LLaMA-Adapter methods."""

from dataclasses import dataclass


@dataclass
class AdapterArgs:
    prompt_length: int = 10
    """learned prefix tokens per adapted layer"""
    start_layer: int = 2
    """layers below this one get no adapter"""

    def as_config(self) -> dict:
        return {"adapter_prompt_length": self.prompt_length, "adapter_start_layer": self.start_layer}
