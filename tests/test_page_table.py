"""`DevicePageTables`: the step's CSR page indices gathered on the device equal the page tables
kept as lists, through appends, resets (preemption), removals and growth of rows and columns."""

from __future__ import annotations

import random

import pytest
import torch

from vlmd.kernels.page_table import DevicePageTables

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_gathered_indices_equal_the_tables_as_lists(device):
    rng = random.Random(0)
    tables = DevicePageTables(torch.device(device), rows=2, columns=3)  # small: both grow
    model: dict[str, list[int]] = {}
    next_id = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.15 or not model:
            rid = f"r{next_id}"
            next_id += 1
            tables.add(rid)
            model[rid] = []
        elif op < 0.2:
            rid = rng.choice(list(model))
            tables.remove(rid)
            del model[rid]
        elif op < 0.25:
            rid = rng.choice(list(model))
            tables.reset(rid)
            model[rid] = []
        else:  # a step: some requests get pages, then the step's indices are gathered
            step = rng.sample(list(model), rng.randint(1, len(model)))
            rows, num_pages = [], []
            for rid in step:
                pages = [rng.randrange(10_000) for _ in range(rng.choice([0, 0, 1, 2, 7]))]
                model[rid] += pages
                rows.append(tables.append(rid, pages))
                num_pages.append(rng.randint(0, len(model[rid])))  # the pages holding tokens
            tables.flush()
            got = tables.gather(rows, num_pages)
            want = [p for rid, n in zip(step, num_pages, strict=True) for p in model[rid][:n]]
            assert got.dtype == torch.int32 and got.device.type == device
            assert got.tolist() == want
    assert tables.table.shape[0] > 2 and tables.table.shape[1] > 3
