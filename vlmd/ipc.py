"""Length-prefixed msgpack frames over Unix domain sockets, on asyncio.

One `Channel` per connection, usable in both directions. Frames are `<u32 length><msgpack>`.
"""

from __future__ import annotations

import asyncio
import struct

import msgspec

from vlmd.messages import ANY_MESSAGE, Message

_HEADER = struct.Struct("<I")
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ANY_MESSAGE)


class ChannelClosed(ConnectionError):
    """The peer closed the connection (or died)."""


class Channel:
    """A bidirectional message stream over one socket connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    def send(self, msg: Message) -> None:
        """Queue a message; the transport writes it without blocking the caller."""
        payload = _encoder.encode(msg)
        self._writer.write(_HEADER.pack(len(payload)) + payload)

    async def recv(self) -> Message:
        try:
            header = await self._reader.readexactly(_HEADER.size)
            (length,) = _HEADER.unpack(header)
            return _decoder.decode(await self._reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            raise ChannelClosed(str(exc)) from exc

    async def drain(self) -> None:
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()


async def connect(path: str, hello: Message | None = None) -> Channel:
    reader, writer = await asyncio.open_unix_connection(path)
    channel = Channel(reader, writer)
    if hello is not None:
        channel.send(hello)
    return channel


async def connect_when_listening(path: str, hello: Message, timeout_s: float) -> Channel:
    """`connect`, waiting for a peer process that starts at the same time to begin listening."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            return await connect(path, hello)
        except (FileNotFoundError, ConnectionRefusedError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def serve(path: str, on_channel) -> asyncio.AbstractServer:
    """Listen on `path`; `on_channel(channel)` is awaited for every accepted connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await on_channel(Channel(reader, writer))

    return await asyncio.start_unix_server(handle, path=path)
