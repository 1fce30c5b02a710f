"""What the actors that run a model on a device share: the LM workers and the ViT ranks (which,
under --vit_placement worker, live in the same process)."""

from __future__ import annotations

import torch

from vlmd import shm
from vlmd.actors.launch import Launch

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A collective that waits longer than this raises instead of hanging the rank forever.
TP_TIMEOUT_S = 600


def embed_store_view(launch: Launch) -> torch.Tensor | None:
    """The shared EmbedStore as a [rows, hidden] tensor (no copy), or None without images."""
    runtime = launch.runtime
    if not runtime.embed_store:
        return None
    segment = shm.SharedSegment.attach(runtime.embed_store)
    count = runtime.embed_store_rows * runtime.hidden_size
    store = torch.frombuffer(segment.buf, dtype=TORCH_DTYPES[runtime.dtype], count=count)
    return store.view(runtime.embed_store_rows, runtime.hidden_size)
