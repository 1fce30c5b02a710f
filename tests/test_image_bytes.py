"""A request image's bytes in the http actor: base64 decoding and the MD5 a slice at a time, the
event loop running between slices, with the results of the one-call functions."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmd.actors.images import BadImage, decode_base64, md5_hex


def one_call(text: str) -> bytes | None:
    """What the whole-text call gives (None: it rejects the text)."""
    try:
        return base64.b64decode(text.partition(",")[2] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError):
        return None


def sliced(text: str, slice_bytes: int) -> bytes | None:
    try:
        return asyncio.run(decode_base64(0, text, slice_bytes))
    except BadImage:
        return None


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=40).map(lambda raw: base64.b64encode(raw).decode()),  # valid
        st.tuples(st.binary(max_size=40), st.integers(0, 6)).map(  # more padding than needed
            lambda case: base64.b64encode(case[0]).decode().rstrip("=") + "=" * case[1]
        ),
        st.text(alphabet="AQgw+/=", max_size=40),  # padding anywhere, lengths of every remainder
        st.text(alphabet="Ab9=\n -é", max_size=12),  # characters outside the alphabet
    ),
    st.sampled_from([3, 6, 9, 3 << 16]),
    st.booleans(),
)
def test_sliced_base64_decodes_and_rejects_as_the_one_call(text, slice_bytes, data_url):
    if data_url:
        text = "data:image/png;base64," + text
    assert sliced(text, slice_bytes) == one_call(text)


def test_padding_between_slices_is_rejected():
    text = base64.b64encode(b"ab").decode() + base64.b64encode(b"cd").decode()  # "YWI=Y2Q="
    assert one_call(text) is None and sliced(text, 3) is None


@pytest.mark.parametrize(
    "text", ["AAAA=", "AAAA====", "AAAAAAAA=", "AAAAAAAAAAAA===", "AAAAAAAAA", "AAAAAAAAAAAAA=", "AAAA=A"]
)
def test_what_follows_the_last_quantum_is_judged_as_the_one_call_judges_it(text):
    """Padding or a partial quantum after whole quanta, at every place a slice could end."""
    assert [sliced(text, 3), sliced(text, 6)] == [one_call(text)] * 2


@pytest.mark.parametrize("size", [0, 1, 5, 3 << 10, (3 << 10) + 7])
def test_sliced_md5_is_the_md5(size):
    data = os.urandom(size)
    assert asyncio.run(md5_hex(data, 3 << 8)) == hashlib.md5(data).hexdigest()


def test_the_event_loop_runs_between_slices():
    """Another task (a stream's tokens, in the http actor) runs while a large image is decoded
    and hashed: at least once per slice."""
    data = os.urandom(3 << 16)
    text = base64.b64encode(data).decode()

    async def main() -> tuple[bytes, str, int]:
        turns = 0

        async def ticker() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        decoded = await decode_base64(0, text, 3 << 10)
        digest = await md5_hex(decoded, 3 << 10)
        task.cancel()
        return decoded, digest, turns

    decoded, digest, turns = asyncio.run(main())
    assert decoded == data and digest == hashlib.md5(data).hexdigest()
    assert turns >= 2 * 64 - 2  # 64 slices each: a turn of the loop between two slices
