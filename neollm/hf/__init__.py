"""transformers integration: ``NeoLLMConfig`` / ``NeoLLMForCausalLM`` (remote code).

``tools/convert_to_hf.py`` copies ``configuration_neollm.py`` and ``modeling_neollm.py`` into an
exported folder (``auto_map`` in its config.json points at them), so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it. Both files
import the installed ``neollm`` package (the model code itself is not copied): the exported
folder needs ``pip install neollm``. ``tools/convert_from_hf.py`` goes back to a DCP checkpoint.
"""

from neollm.hf.configuration_neollm import NeoLLMConfig
from neollm.hf.modeling_neollm import NeoLLMForCausalLM, NeoLLMPreTrainedModel

__all__ = ["NeoLLMConfig", "NeoLLMForCausalLM", "NeoLLMPreTrainedModel"]
