"""Sans-IO ttrpc framing: bytes in -> frames out, frames in -> bytes out. No sockets, no threads.

Wire format (containerd/ttrpc PROTOCOL.md): a 10-byte header -- payload length u32 BE, stream id
u32 BE, type u8, flags u8 -- then the payload. Payloads over 4 MiB are refused: the decoder reports
them as OversizedFrame and skips their bytes, so the stream of frames stays in sync.

Two layers live here, in the style of h11:
- FrameDecoder / encode_frame: raw frames, any type.
- ServerProtocol / ClientProtocol: ttrpc.Request / ttrpc.Response messages on top of the frames, with
  the protocol rules (odd client stream ids, unknown frame types ignored, oversized -> ResourceExhausted).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from revenant_pb.ttrpc import ttrpc_pb2
from shim.ttrpc.errors import Code

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_PAYLOAD = 4 << 20  # 4 MiB, the limit of the Go implementation


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Flags(enum.IntFlag):
    REMOTE_CLOSED = 1
    REMOTE_OPEN = 2
    NO_DATA = 4


@dataclass(frozen=True, slots=True)
class Frame:
    stream_id: int
    type: int  # a FrameType value, or an unknown type the caller should ignore
    flags: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """A frame whose declared payload exceeds the limit; its payload is skipped, not buffered."""

    stream_id: int
    type: int
    flags: int
    length: int


def encode_frame(stream_id: int, type: int, payload: bytes, flags: int = 0) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"ttrpc payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return HEADER.pack(len(payload), stream_id, type, flags) + payload


class FrameDecoder:
    """Feed it byte slices of any size; it returns each complete frame exactly once, in order."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._skip = 0  # payload bytes of an oversized frame still to discard

    def feed(self, data: bytes) -> list[Frame | OversizedFrame]:
        buf = self._buf
        buf += data
        out: list[Frame | OversizedFrame] = []
        pos = 0  # consumed so far; the buffer is trimmed once per feed, not once per frame
        with memoryview(buf) as view:
            while True:
                if self._skip:
                    n = min(self._skip, len(buf) - pos)
                    pos += n
                    self._skip -= n
                    if self._skip:
                        break
                if len(buf) - pos < HEADER_SIZE:
                    break
                length, stream_id, type_, flags = HEADER.unpack_from(buf, pos)
                if length > self.max_payload:
                    pos += HEADER_SIZE
                    self._skip = length
                    out.append(OversizedFrame(stream_id, type_, flags, length))
                    continue
                end = pos + HEADER_SIZE + length
                if len(buf) < end:
                    break
                out.append(Frame(stream_id, type_, flags, bytes(view[pos + HEADER_SIZE : end])))
                pos = end
        del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet complete (0 between frames)."""
        return len(self._buf)


# ---- message layer -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    stream_id: int
    request: ttrpc_pb2.Request


@dataclass(frozen=True, slots=True)
class StreamRejected:
    """The peer sent something this side must answer with an error status on that stream."""

    stream_id: int
    code: Code
    message: str


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    stream_id: int
    response: ttrpc_pb2.Response


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """A response for this stream arrived but could not be used (too large or undecodable)."""

    stream_id: int
    code: Code
    message: str


def encode_response(stream_id: int, code: int = Code.OK, message: str = "", payload: bytes = b"") -> bytes:
    resp = ttrpc_pb2.Response(payload=payload)
    resp.status.code = int(code)
    resp.status.message = message
    data = resp.SerializeToString()
    if len(data) > MAX_PAYLOAD:
        # Answer with an error the peer can read instead of a frame it would refuse.
        return encode_response(
            stream_id,
            Code.RESOURCE_EXHAUSTED,
            f"response of {len(data)} bytes exceeds the {MAX_PAYLOAD}-byte limit",
        )
    return encode_frame(stream_id, FrameType.RESPONSE, data)


class ServerProtocol:
    """Server side of one connection: bytes in -> RequestReceived / StreamRejected events."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._decoder = FrameDecoder(max_payload)

    def receive_data(self, data: bytes) -> list[RequestReceived | StreamRejected]:
        events: list[RequestReceived | StreamRejected] = []
        for frame in self._decoder.feed(data):
            if frame.type != FrameType.REQUEST:
                continue  # responses, data frames of streams we do not serve, future types: ignore
            if frame.stream_id % 2 != 1:
                events.append(
                    StreamRejected(
                        frame.stream_id,
                        Code.INVALID_ARGUMENT,
                        "StreamID must be odd for client initiated streams",
                    )
                )
            elif isinstance(frame, OversizedFrame):
                limit = self._decoder.max_payload
                events.append(
                    StreamRejected(
                        frame.stream_id,
                        Code.RESOURCE_EXHAUSTED,
                        f"message length {frame.length} exceed maximum message size of {limit}",
                    )
                )
            else:
                req = ttrpc_pb2.Request()
                try:
                    req.ParseFromString(frame.payload)
                except DecodeError as exc:
                    events.append(StreamRejected(frame.stream_id, Code.INVALID_ARGUMENT, f"bad request: {exc}"))
                    continue
                events.append(RequestReceived(frame.stream_id, req))
        return events


class ClientProtocol:
    """Client side of one connection: allocates odd stream ids, encodes requests, decodes responses."""

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._decoder = FrameDecoder(max_payload)
        self._next_id = 1

    def next_stream_id(self) -> int:
        sid = self._next_id
        if sid > 0xFFFFFFFF:
            raise OverflowError("ttrpc stream ids exhausted on this connection")
        self._next_id += 2
        return sid

    @staticmethod
    def encode_request(stream_id: int, request: ttrpc_pb2.Request) -> bytes:
        return encode_frame(stream_id, FrameType.REQUEST, request.SerializeToString())

    def receive_data(self, data: bytes) -> list[ResponseReceived | StreamFailed]:
        events: list[ResponseReceived | StreamFailed] = []
        for frame in self._decoder.feed(data):
            if frame.type != FrameType.RESPONSE:
                continue
            if isinstance(frame, OversizedFrame):
                limit = self._decoder.max_payload
                events.append(
                    StreamFailed(
                        frame.stream_id,
                        Code.RESOURCE_EXHAUSTED,
                        f"response length {frame.length} exceeds maximum message size of {limit}",
                    )
                )
                continue
            resp = ttrpc_pb2.Response()
            try:
                resp.ParseFromString(frame.payload)
            except DecodeError as exc:
                events.append(StreamFailed(frame.stream_id, Code.INTERNAL, f"bad response: {exc}"))
                continue
            events.append(ResponseReceived(frame.stream_id, resp))
        return events
