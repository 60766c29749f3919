"""The guest agent's wire format, shared by the host client and the agent in the guest.

This module is imported by both ends, so the format is defined once. It must run in the
guest's minimal Python (no site, a few modules): it uses only builtins and ``struct``.
``json`` is not used on purpose: importing it (and ``re``) costs about 0.7 s under TCG.

A frame is a 12-byte header and a payload::

    u16 magic 0x4C4B ("LK")   u8 kind   u8 reserved   u32 stream   u32 payload length

``stream`` names one conversation: a call and its reply, or a process or file transfer
and all its data. Control payloads (HELLO, CALL, REPLY, EVENT, CONTROL) are values in a
small self-describing binary encoding (:func:`pack` / :func:`unpack`: None, bools,
64-bit ints, floats, text, bytes, lists, dicts with text keys), strict and bounded, because
the host must parse what an untrusted guest sends. Data payloads are raw bytes.

Flow control is by offsets, per stream and channel (0 stdin, 1 stdout, 2 stderr): a
receiver sends WINDOW(channel, consumed, window) and the sender may send bytes up to
``consumed + window``. The sender keeps what it sent beyond ``consumed``, so after the host
reconnects it can send it again (reattach). Neither side ever holds more than a window
of one channel's data, however fast the other produces it.
"""

from __future__ import annotations

import struct

VERSION = 1
"""The protocol version this module speaks. A HELLO names the versions each side speaks."""

HELLO_MAGIC = "lanekit-agent"
MAGIC = 0x4C4B
HEADER = struct.Struct("<HBBII")
MAX_PAYLOAD = 1 << 20
DATA_CHUNK = 256 << 10
"""The most data a sender puts in one DATA frame."""
DEFAULT_WINDOW = 1 << 20

# Frame kinds
HELLO = 1  # host -> guest: start a session; guest -> host: the answer
ALIVE = 2  # guest -> host: an agent (re)started; the host answers with HELLO
CALL = 3  # host -> guest: {"op": ..., ...}; one REPLY answers it on the same stream
REPLY = 4  # guest -> host: {"ok": value} or {"error": {"kind": ..., "message": ...}}
EVENT = 5  # guest -> host: a process's events ({"event": "exited", ...})
CONTROL = 6  # host -> guest: to a running stream ({"op": "signal", ...}); no reply
DATA = 7  # both ways: u8 channel, u64 offset, bytes
WINDOW = 8  # both ways: u8 channel, u64 consumed, u32 window
EOF = 9  # both ways: u8 channel, u64 final offset

KINDS = frozenset(range(HELLO, EOF + 1))
STDIN, STDOUT, STDERR = 0, 1, 2
CHANNELS = (STDIN, STDOUT, STDERR)

_DATA = struct.Struct("<BQ")
_WINDOW = struct.Struct("<BQI")
_EOF = struct.Struct("<BQ")
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_MAX_DEPTH = 16


class ProtocolError(Exception):
    """The peer sent something this protocol does not allow; the session is unusable."""


def frame(kind: int, stream: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"a payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
    return HEADER.pack(MAGIC, kind, 0, stream, len(payload)) + payload


def data_frame(stream: int, channel: int, offset: int, data: bytes | memoryview) -> bytes:
    return b"".join(data_frame_parts(stream, channel, offset, data))


def data_frame_parts(
    stream: int, channel: int, offset: int, data: bytes | memoryview
) -> tuple[bytes, bytes | memoryview]:
    """A DATA frame as (header, payload), so a big payload is never copied to frame it."""
    if len(data) + _DATA.size > MAX_PAYLOAD:
        raise ProtocolError(f"{len(data)} bytes of data are more than one frame holds")
    header = HEADER.pack(MAGIC, DATA, 0, stream, _DATA.size + len(data))
    return header + _DATA.pack(channel, offset), data


def window_frame(stream: int, channel: int, consumed: int, window: int) -> bytes:
    return frame(WINDOW, stream, _WINDOW.pack(channel, consumed, window))


def eof_frame(stream: int, channel: int, offset: int) -> bytes:
    return frame(EOF, stream, _EOF.pack(channel, offset))


def parse_data(payload: bytes) -> tuple[int, int, bytes]:
    """(channel, offset, bytes) of a DATA payload."""
    if len(payload) < _DATA.size:
        raise ProtocolError("a DATA frame is too short")
    channel, offset = _DATA.unpack_from(payload)
    _check_channel(channel)
    return channel, offset, payload[_DATA.size :]


def parse_window(payload: bytes) -> tuple[int, int, int]:
    """(channel, consumed, window) of a WINDOW payload."""
    if len(payload) != _WINDOW.size:
        raise ProtocolError("a WINDOW frame has the wrong size")
    channel, consumed, window = _WINDOW.unpack(payload)
    _check_channel(channel)
    return channel, consumed, window


def parse_eof(payload: bytes) -> tuple[int, int]:
    """(channel, final offset) of an EOF payload."""
    if len(payload) != _EOF.size:
        raise ProtocolError("an EOF frame has the wrong size")
    channel, offset = _EOF.unpack(payload)
    _check_channel(channel)
    return channel, offset


def _check_channel(channel: int) -> None:
    if channel not in CHANNELS:
        raise ProtocolError(f"unknown channel {channel}")


class FrameReader:
    """Splits a byte stream into frames; call :meth:`feed`, then :meth:`frames`."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def reset(self) -> None:
        """Forget a partial frame (the peer went away mid-frame)."""
        self._buffer.clear()

    def frames(self) -> list[tuple[int, int, bytes]]:
        """Every complete frame buffered, as (kind, stream, payload)."""
        out = []
        buf = self._buffer
        pos = 0
        while len(buf) - pos >= HEADER.size:
            magic, kind, _, stream, length = HEADER.unpack_from(buf, pos)
            if magic != MAGIC or kind not in KINDS:
                del buf[:pos]
                raise ProtocolError(f"bad frame header {bytes(buf[: HEADER.size]).hex()}")
            if length > MAX_PAYLOAD:
                del buf[:pos]
                raise ProtocolError(f"a frame announces {length} bytes, over {MAX_PAYLOAD}")
            end = pos + HEADER.size + length
            if len(buf) < end:
                break
            out.append((kind, stream, bytes(buf[pos + HEADER.size : end])))
            pos = end
        del buf[:pos]
        return out

    def resync(self) -> None:
        """After a protocol error: skip to the next header that starts a HELLO."""
        marker = HEADER.pack(MAGIC, HELLO, 0, 0, 0)[:4]
        index = self._buffer.find(marker, 1)
        if index < 0:
            keep = len(marker) - 1
            del self._buffer[: max(0, len(self._buffer) - keep)]
        else:
            del self._buffer[:index]


# ---------------------------------------------------------------- values


def pack(value: object) -> bytes:
    """Encode a control value (see the module docstring for the types)."""
    out = bytearray()
    _pack(value, out, 0)
    return bytes(out)


def _pack(value: object, out: bytearray, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ProtocolError("a value nests too deeply")
    if value is None:
        out += b"N"
    elif value is True:
        out += b"T"
    elif value is False:
        out += b"F"
    elif isinstance(value, int):
        out += b"i" + _I64.pack(value)
    elif isinstance(value, float):
        out += b"f" + _F64.pack(value)
    elif isinstance(value, str):
        raw = value.encode("utf-8", "surrogateescape")
        out += b"s" + _U32.pack(len(raw)) + raw
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        out += b"b" + _U32.pack(len(raw)) + raw
    elif isinstance(value, list | tuple):
        out += b"l" + _U32.pack(len(value))
        for item in value:
            _pack(item, out, depth + 1)
    elif isinstance(value, dict):
        out += b"d" + _U32.pack(len(value))
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProtocolError(f"dict keys must be text, not {type(key).__name__}")
            _pack(key, out, depth + 1)
            _pack(item, out, depth + 1)
    else:
        raise ProtocolError(f"cannot encode a {type(value).__name__}")


def unpack(data: bytes) -> object:
    """Decode a control value; anything malformed or trailing is a ProtocolError."""
    try:
        value, pos = _unpack(data, 0, 0)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed value: {exc}") from None
    if pos != len(data):
        raise ProtocolError(f"{len(data) - pos} bytes after a value")
    return value


def _unpack(data: bytes, pos: int, depth: int) -> tuple[object, int]:
    if depth > _MAX_DEPTH:
        raise ProtocolError("a value nests too deeply")
    tag = data[pos : pos + 1]
    pos += 1
    if tag == b"N":
        return None, pos
    if tag == b"T":
        return True, pos
    if tag == b"F":
        return False, pos
    if tag == b"i":
        return _I64.unpack_from(data, pos)[0], pos + 8
    if tag == b"f":
        return _F64.unpack_from(data, pos)[0], pos + 8
    if tag in (b"s", b"b"):
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        if pos + n > len(data):
            raise ProtocolError("a string runs past the end")
        raw = data[pos : pos + n]
        return (raw.decode("utf-8", "surrogateescape") if tag == b"s" else raw), pos + n
    if tag == b"l":
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        if n > len(data) - pos:
            raise ProtocolError("a list is longer than its frame")
        items = []
        for _ in range(n):
            item, pos = _unpack(data, pos, depth + 1)
            items.append(item)
        return items, pos
    if tag == b"d":
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        if n > len(data) - pos:
            raise ProtocolError("a dict is longer than its frame")
        result = {}
        for _ in range(n):
            key, pos = _unpack(data, pos, depth + 1)
            if not isinstance(key, str):
                raise ProtocolError("a dict key is not text")
            result[key], pos = _unpack(data, pos, depth + 1)
        return result, pos
    raise ProtocolError(f"unknown value tag {tag!r}")


def message(kind: int, stream: int, value: object) -> bytes:
    """A control frame carrying ``value``."""
    return frame(kind, stream, pack(value))


def parse_message(payload: bytes) -> dict[str, object]:
    """A control payload, which is always a dict."""
    value = unpack(payload)
    if not isinstance(value, dict):
        raise ProtocolError("a control message is not a dict")
    return value
