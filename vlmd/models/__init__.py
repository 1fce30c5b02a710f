"""InternVL models: architecture config, vision tower, language models (one file per family),
the checkpoint layouts and the loader.

Only the torch-free config is re-exported here, so `import vlmd.models.config` (the scheduler,
the HTTP front end) never pays for a torch import; model code lives in its submodules:
`vlmd.models.loader.load_vision` / `load_language_model`.
"""

from vlmd.models.config import InternVLArch

__all__ = ["InternVLArch"]
