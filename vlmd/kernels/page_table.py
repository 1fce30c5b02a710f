"""Every request's KV page table as a row of one int32 tensor on the model's device.

The attention kernels take a step's page tables in CSR form: request after request, the pages
holding its tokens. Built on the host, that is work proportional to every context in the batch,
every step (at batch 256 with 16k-token contexts, a quarter million page ids). Here a step
changes only what changed: the pages the scheduler appended (a few per request every page_size
tokens) are written into the rows on the device, and the step's CSR page indices are gathered
on the device from its requests' rows and lengths: host work per request, never per page.
"""

from __future__ import annotations

import torch

from vlmd.kernels.transfer import to_device


class DevicePageTables:
    def __init__(self, device: torch.device, rows: int = 64, columns: int = 256) -> None:
        self.device = device
        self.table = torch.zeros(rows, columns, dtype=torch.int32, device=device)
        self._row_of: dict[str, int] = {}
        self._free_rows = list(range(rows))[::-1]
        self.num_pages: list[int] = [0] * rows  # per row, the pages of its request so far
        self._writes: list[int] = []  # staged (row, column, page) triplets, flattened

    def add(self, request_id: str) -> None:
        """A new request, with an empty table."""
        if not self._free_rows:
            self._grow(rows=2 * self.table.shape[0])
        row = self._free_rows.pop()
        self._row_of[request_id] = row
        self.num_pages[row] = 0

    def remove(self, request_id: str) -> None:
        row = self._row_of.pop(request_id, None)
        if row is not None:
            self._free_rows.append(row)

    def reset(self, request_id: str) -> None:
        """The request's KV is gone (preempted): its table starts empty again."""
        row = self._row_of.get(request_id)
        if row is not None:
            self.num_pages[row] = 0

    def append(self, request_id: str, pages: list[int]) -> int:
        """Append pages to a request's table (written to the device at `flush`); returns its row."""
        row = self._row_of[request_id]
        start = self.num_pages[row]
        if start + len(pages) > self.table.shape[1]:
            self._grow(columns=max(2 * self.table.shape[1], start + len(pages)))
        for offset, page in enumerate(pages):
            self._writes += (row, start + offset, page)
        self.num_pages[row] = start + len(pages)
        return row

    def flush(self) -> None:
        """Queue the staged writes on the device (one copy, one scatter; nothing waits)."""
        if self._writes:
            writes = to_device(self._writes, torch.long, self.device).view(-1, 3)  # [n, (row, col, page)]
            self.table[writes[:, 0], writes[:, 1]] = writes[:, 2].to(torch.int32)
            self._writes = []

    def gather(self, rows: list[int], num_pages: list[int]) -> torch.Tensor:
        """The CSR page indices of a step: the first num_pages[i] pages of row rows[i], request
        after request, as an int32 tensor on the device. Staged writes must be flushed first."""
        assert not self._writes, "flush the staged writes before gathering"
        total = sum(num_pages)
        n = len(rows)
        starts = [0] * n
        for i in range(1, n):
            starts[i] = starts[i - 1] + num_pages[i - 1]
        meta = to_device(rows + num_pages + starts, torch.long, self.device)
        row_t, count_t, start_t = meta[:n], meta[n : 2 * n], meta[2 * n :]
        row_of_entry = torch.repeat_interleave(row_t, count_t, output_size=total)  # [total]
        first_of_entry = torch.repeat_interleave(start_t, count_t, output_size=total)
        column = torch.arange(total, device=self.device) - first_of_entry
        return self.table[row_of_entry, column]

    def _grow(self, rows: int | None = None, columns: int | None = None) -> None:
        old_rows, old_columns = self.table.shape
        rows, columns = rows or old_rows, columns or old_columns
        table = torch.zeros(rows, columns, dtype=torch.int32, device=self.device)
        self.flush()  # writes staged for the old table land in it before it is copied
        table[:old_rows, :old_columns] = self.table
        self.table = table
        self._free_rows = list(range(old_rows, rows))[::-1] + self._free_rows
        self.num_pages += [0] * (rows - old_rows)
