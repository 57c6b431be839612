"""megatron-ultralong: ultra-long-context (1M-4M tokens) training for Llama on Megatron-Core."""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core warns at import, on every CPU process, that the optional GPU extras (NVIDIA apex,
# Transformer Engine) are absent. The plugin is built to run without them (docs/architecture.md),
# so these particular notices are silenced; every other warning is left alone.
_warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine)( and Apex)? (is|are) not installed.*")
