"""Compile FlashInfer's JIT modules ahead, one process per module, all at once: the modules the GPU
tests and the 8B-shaped benches use (`vlmd.kernels.warm`, which `vlmd serve` uses for its model).

    python bench/warm_kernels.py
    python bench/warm_kernels.py --jobs prefill:bf16:128 decode-tc:bf16:128 ops
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vlmd.kernels.warm import main  # noqa: E402

if __name__ == "__main__":
    main()
