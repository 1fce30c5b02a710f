"""The token history that repetition, presence and frequency penalties read, for a whole batch.

Every penalized request owns one row of a [rows, vocab] int32 table on the device: 2 x (times
the token was generated) + (1 if it is in the prompt). A step applies the three penalties to the
whole batch's logits at once, each row reading its history row (none for a request without
penalties), and records the tokens it drew with one scatter, so the work per step is a few
kernels whatever the batch. Rows are reused; the table doubles when full (a copy, once per
doubling).

`torch_penalize` is the contract op by op (the CPU, and the reference of the tests). Op by op, a
batch of 64 rows over a 151,674-token vocabulary moves about 1.4 GB through the GPU's memory by a
count of its reads and writes (a dozen [rows, vocab] temporaries); `TritonPenalize` reads the
logits and the history rows once and writes the result once (about 0.12 GB), with the same
float32 results.
"""

from __future__ import annotations

import torch

from vlmd.kernels.probe import built_or_fallback, require_triton, tl, triton
from vlmd.kernels.transfer import to_device
from vlmd.messages import SamplingParams

IN_PROMPT, GENERATED = 1, 2  # the two parts of a history entry


def penalized(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
    )


class PenaltyTable:
    """The history rows of penalized requests; a row's prompt is written when the request first
    samples (the vocabulary is known from then on)."""

    def __init__(self, device: torch.device, penalize=None) -> None:
        """penalize: the kernel (`make_penalize` for the device by default)."""
        self.device = device
        self.penalize = penalize or make_penalize(device)
        self.history: torch.Tensor | None = None  # [capacity, vocab] int32, from the first use
        self._free: list[int] = []
        self._unwritten: dict[int, list[int]] = {}  # row -> prompt ids, until the row is written
        self._num_rows = 0  # rows ever handed out

    def add(self, prompt_ids: list[int], repetition: bool) -> int:
        """A row for a new request; the prompt counts only for the repetition penalty."""
        row = self._free.pop() if self._free else self._grow_row()
        self._unwritten[row] = list(prompt_ids) if repetition else []
        return row

    def remove(self, row: int) -> None:
        self._unwritten.pop(row, None)
        self._free.append(row)

    def _grow_row(self) -> int:
        self._num_rows += 1
        return self._num_rows - 1

    def _ensure(self, vocab_size: int) -> torch.Tensor:
        capacity = 0 if self.history is None else self.history.shape[0]
        if capacity < self._num_rows:
            grown = torch.zeros(
                max(8, 2 * capacity, self._num_rows), vocab_size, dtype=torch.int32, device=self.device
            )
            if self.history is not None:
                grown[:capacity] = self.history
            self.history = grown
            # Filled on the device: a tensor made from a host number would be a copy that waits.
            self._in_prompt = torch.full((), IN_PROMPT, dtype=torch.int32, device=self.device)
            self._generated = torch.full((), GENERATED, dtype=torch.int32, device=self.device)
        if self._unwritten:  # new rows: cleared, then their prompts marked, one op each
            rows = list(self._unwritten)
            self.history.index_fill_(0, to_device(rows, torch.long, self.device), 0)
            marked = [(row, token) for row in rows for token in self._unwritten[row]]
            if marked:
                index = to_device(marked, torch.long, self.device)  # [n, 2]: row, token
                self.history.index_put_((index[:, 0], index[:, 1]), self._in_prompt)
            self._unwritten.clear()
        return self.history

    def apply(self, logits: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """logits [n, vocab] float32 of a batch's requests whose history rows are `rows` [n]
        (device; -1: none, the row comes back as it is), with their penalties `values` [n, 3]
        float32 (repetition, presence, frequency) applied; a new tensor."""
        return self.penalize(logits, self._ensure(logits.shape[-1]), rows, values)

    def observe(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count the tokens just drawn (one per row) as generated."""
        self.history.index_put_((rows, tokens), self._generated, accumulate=True)

    def check_integrity(self, held_rows: list[int]) -> None:
        """`held_rows`: the rows of the requests still running, each held once and not free."""
        free = set(self._free)
        assert len(free) == len(self._free) and all(0 <= r < self._num_rows for r in free)
        assert len(set(held_rows)) == len(held_rows) and not free & set(held_rows)


def torch_penalize(
    logits: torch.Tensor, history: torch.Tensor, rows: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """`PenaltyTable.apply` op by op: history [capacity, vocab] int32, the table.

    The CTRL repetition penalty on tokens of the prompt or the output, as transformers applies it
    (positive logits divided, negative multiplied), then OpenAI's penalties on the output's token
    counts: logit - frequency * count - presence * (count > 0)."""
    entries = history[rows.clamp(min=0)] * (rows >= 0)[:, None]  # [n, vocab]; 0 for no row
    counts = entries >> 1
    repetition, presence, frequency = values[:, 0:1], values[:, 1:2], values[:, 2:3]
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(entries > 0, repeated, logits)
    return logits - frequency * counts - presence * (counts > 0)


if triton is not None:  # the CUDA path only; a CPU install has no Triton

    @triton.jit
    def _penalize_kernel(
        logits_ptr,
        logits_stride,
        history_ptr,
        history_stride,
        rows_ptr,
        values_ptr,
        out_ptr,
        vocab,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < vocab
        x = tl.load(logits_ptr + row.to(tl.int64) * logits_stride + cols, mask=ok, other=0.0)
        history_row = tl.load(rows_ptr + row)
        entry = tl.load(
            history_ptr + history_row.to(tl.int64) * history_stride + cols,
            mask=ok & (history_row >= 0),
            other=0,
        )
        repetition = tl.load(values_ptr + 3 * row)
        presence = tl.load(values_ptr + 3 * row + 1)
        frequency = tl.load(values_ptr + 3 * row + 2)
        # As `torch_penalize`, operation for operation: a correctly rounded division, and no product
        # fused into a subtraction (the launch turns fp fusion off).
        repeated = tl.where(x > 0, tl.div_rn(x, repetition), x * repetition)
        x = tl.where(entry > 0, repeated, x)
        counts = entry >> 1
        x = x - frequency * counts.to(tl.float32)
        x = x - presence * (counts > 0).to(tl.float32)
        tl.store(out_ptr + row.to(tl.int64) * vocab + cols, x, mask=ok)


class TritonPenalize:
    """One Triton kernel over float32 logits whose rows are contiguous: each program reads a
    block of one row and of its history row and writes the penalized block."""

    BLOCK = 2048  # logits per program

    def __init__(self) -> None:
        require_triton()

    def __call__(self, logits, history, rows, values) -> torch.Tensor:
        if (
            logits.dtype != torch.float32
            or logits.dim() != 2
            or logits.stride(1) != 1
            or history.stride(1) != 1
        ):
            return torch_penalize(logits, history, rows, values)
        num_rows, vocab = logits.shape
        out = torch.empty(num_rows, vocab, dtype=torch.float32, device=logits.device)
        _penalize_kernel[(num_rows, triton.cdiv(vocab, self.BLOCK))](
            logits,
            logits.stride(0),
            history,
            history.stride(0),
            rows.contiguous(),  # int64 or int32: the kernel reads either
            values.to(torch.float32).contiguous(),
            out,
            vocab,
            BLOCK=self.BLOCK,
            num_warps=4,
            enable_fp_fusion=False,
        )
        return out


def make_penalize(device: torch.device):
    """Triton's kernel on CUDA, built and checked against the torch reference once here (equal
    results, or torch's ops, with the reason logged); else torch."""
    if device.type != "cuda":
        return torch_penalize

    def build() -> TritonPenalize:
        fused = TritonPenalize()
        generator = torch.Generator(device=device).manual_seed(0)
        vocab = 2 * TritonPenalize.BLOCK + 5
        logits = torch.randn(4, vocab, device=device, generator=generator) * 3
        history = torch.randint(0, 7, (6, vocab), dtype=torch.int32, device=device, generator=generator)
        rows = torch.tensor([2, -1, 0, 5], device=device)
        values = torch.tensor(
            [[1.3, 0.5, 0.25], [1.0, 0.0, 0.0], [0.7, -1.0, -0.5], [1.05, 0.0, 0.1]], device=device
        )
        if not torch.equal(
            fused(logits, history, rows, values), torch_penalize(logits, history, rows, values)
        ):
            raise RuntimeError("its logits differ from the torch reference's")
        return fused

    return built_or_fallback(build, torch_penalize, "sampling's penalties run")
