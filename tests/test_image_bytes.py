"""A request image's bytes in the http actor: base64 decoded by pybase64 under the standard
library's rules, and the MD5, both on the bytes thread for a large image while the event loop
goes on, with the results of the standard library's one-call functions."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmd.actors.images import THREAD_BYTES, BadImage, _decode_base64, decode_base64, md5_hex


def one_call(text: str) -> bytes | None:
    """What the standard library's call gives on the text without its whitespace (None: it
    rejects the text)."""
    text = text.partition(",")[2] if text.lower().startswith("data:") else text
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def decoded(text: str) -> bytes | None:
    try:
        return asyncio.run(decode_base64(0, text))
    except BadImage:
        return None


def _insert(text: str, where: int, chars: str) -> str:
    where %= len(text) + 1
    return text[:where] + chars + text[where:]


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=40).map(lambda raw: base64.b64encode(raw).decode()),  # valid
        st.tuples(st.binary(max_size=40), st.integers(0, 6)).map(  # more padding than needed
            lambda case: base64.b64encode(case[0]).decode().rstrip("=") + "=" * case[1]
        ),
        st.text(alphabet="AQgw+/=", max_size=40),  # padding anywhere, lengths of every remainder
        st.text(alphabet="Ab9=\n -é", max_size=12),  # characters outside the alphabet
        st.tuples(st.binary(min_size=12, max_size=40), st.integers(0, 99), st.sampled_from("\n -é_=")).map(
            lambda case: _insert(base64.b64encode(case[0]).decode(), case[1], case[2] * 4)
        ),  # four such characters (whole quanta's worth) anywhere in a long text
    ),
    st.booleans(),
)
def test_base64_decodes_and_rejects_as_the_one_call(text, data_url):
    if data_url:
        text = "data:image/png;base64," + text
    assert decoded(text) == one_call(text)


def test_line_wrapped_base64_and_any_case_of_data_urls_decode():
    """MIME's base64 (76-column lines, as the base64 tool writes it) decodes as LightLLM's
    lenient decode takes it; a data URL's scheme is any case; one without a comma says so."""
    raw = os.urandom(300)
    wrapped = base64.encodebytes(raw).decode()  # "\n" every 76 characters
    assert "\n" in wrapped.strip() and decoded(wrapped) == raw
    assert decoded("DATA:image/png;base64," + base64.b64encode(raw).decode()) == raw
    with pytest.raises(BadImage, match="needs a comma"):
        asyncio.run(decode_base64(0, "data:image/png;base64iVBOR"))


def test_every_short_text_of_padding_and_quanta_is_judged_as_the_one_call_judges_it():
    """Every text of up to 8 characters of 'A', 'Q', 'g', 'w' and '=': the padding rules, where
    pybase64 alone would differ (it refuses padding beyond a whole quantum)."""
    texts = ("".join(chars) for n in range(9) for chars in itertools.product("AQgw=", repeat=n))
    differ = [text for text in texts if _decode_base64(text) != one_call(text)]  # decode_base64's own
    assert not differ, differ[:10]


def test_a_large_text_decodes_on_the_bytes_thread_and_as_the_one_call():
    raw = os.urandom(THREAD_BYTES + 5)
    for text in (base64.b64encode(raw).decode(), base64.b64encode(raw).decode() + "==", "data:,QUJD" * 80000):
        assert decoded(text) == one_call(text)


@pytest.mark.parametrize("size", [0, 1, 5, THREAD_BYTES - 1, THREAD_BYTES, (3 << 20) + 7])
def test_md5_is_the_md5(size):
    data = os.urandom(size)
    assert asyncio.run(md5_hex(data)) == hashlib.md5(data).hexdigest()


def test_the_event_loop_runs_while_an_image_is_decoded_and_hashed():
    """Another task (a stream's tokens, in the http actor) runs, many times, while a large image's
    base64 is decoded and while it is hashed (on the bytes thread, without the GIL)."""
    data = os.urandom(48 << 20)
    text = base64.b64encode(data).decode()

    async def main() -> tuple[bytes, str, int, int]:
        turns = 0

        async def ticker() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        decoded = await decode_base64(0, text)
        while_decoding, turns = turns, 0
        digest = await md5_hex(decoded)
        task.cancel()
        return decoded, digest, while_decoding, turns

    out, digest, while_decoding, while_hashing = asyncio.run(main())
    assert out == data and digest == hashlib.md5(data).hexdigest()
    assert while_decoding >= 10 and while_hashing >= 10
