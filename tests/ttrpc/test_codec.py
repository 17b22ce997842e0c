"""The sans-IO layer: framing, limits and protocol rules, with no sockets involved."""

from __future__ import annotations

import random
import struct

import pytest

from revenant_pb.ttrpc import ttrpc_pb2
from shim.ttrpc.codec import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    ClientProtocol,
    Frame,
    FrameDecoder,
    FrameType,
    OversizedFrame,
    RequestReceived,
    ResponseReceived,
    ServerProtocol,
    StreamFailed,
    StreamRejected,
    encode_frame,
    encode_response,
)
from shim.ttrpc.errors import Code


def request_frame(stream_id: int, method: str = "State", payload: bytes = b"") -> bytes:
    req = ttrpc_pb2.Request(service="containerd.task.v2.Task", method=method, payload=payload)
    return encode_frame(stream_id, FrameType.REQUEST, req.SerializeToString())


def test_header_layout_is_big_endian_length_stream_type_flags() -> None:
    data = encode_frame(0x01020304, FrameType.RESPONSE, b"abc", flags=4)
    assert data == b"\x00\x00\x00\x03" + b"\x01\x02\x03\x04" + b"\x02" + b"\x04" + b"abc"
    assert HEADER_SIZE == 10


def test_partial_reads_byte_by_byte() -> None:
    wire = encode_frame(1, FrameType.REQUEST, b"hello") + encode_frame(3, FrameType.REQUEST, b"world!")
    dec = FrameDecoder()
    frames = []
    for i in range(len(wire)):
        frames += dec.feed(wire[i : i + 1])
    assert frames == [Frame(1, 1, 0, b"hello"), Frame(3, 1, 0, b"world!")]
    assert dec.buffered == 0


def test_several_frames_in_one_read_and_a_trailing_partial() -> None:
    wire = b"".join(encode_frame(i, FrameType.RESPONSE, bytes([i]) * i) for i in (1, 3, 5))
    tail = encode_frame(7, FrameType.RESPONSE, b"tail")
    dec = FrameDecoder()
    frames = dec.feed(wire + tail[:6])
    assert [f.stream_id for f in frames] == [1, 3, 5]
    assert [f.payload for f in frames] == [b"\x01", b"\x03" * 3, b"\x05" * 5]
    assert dec.feed(tail[6:]) == [Frame(7, 2, 0, b"tail")]


def test_zero_length_payload() -> None:
    dec = FrameDecoder()
    assert dec.feed(encode_frame(9, FrameType.RESPONSE, b"")) == [Frame(9, 2, 0, b"")]


def test_max_payload_is_accepted_one_more_byte_is_not() -> None:
    dec = FrameDecoder()
    (frame,) = dec.feed(encode_frame(1, FrameType.REQUEST, b"\0" * MAX_PAYLOAD))
    assert isinstance(frame, Frame) and len(frame.payload) == MAX_PAYLOAD
    with pytest.raises(ValueError):
        encode_frame(1, FrameType.REQUEST, b"\0" * (MAX_PAYLOAD + 1))


def test_oversized_frame_is_reported_and_skipped_without_desync() -> None:
    big = MAX_PAYLOAD + 1
    header = struct.pack(">IIBB", big, 5, FrameType.REQUEST, 0)
    after = encode_frame(7, FrameType.REQUEST, b"next")
    dec = FrameDecoder()
    events = dec.feed(header + b"\xaa" * 1000)  # the big payload arrives in pieces
    assert events == [OversizedFrame(5, 1, 0, big)]
    assert dec.buffered == 0  # skipped, not buffered
    remaining = big - 1000
    chunk = 1 << 20
    while remaining > chunk:
        assert dec.feed(b"\xaa" * chunk) == []
        remaining -= chunk
    assert dec.feed(b"\xaa" * remaining + after) == [Frame(7, 1, 0, b"next")]


def test_server_answers_oversized_request_with_resource_exhausted() -> None:
    proto = ServerProtocol(max_payload=64)
    wire = struct.pack(">IIBB", 65, 3, FrameType.REQUEST, 0) + b"x" * 65 + request_frame(5)
    events = proto.receive_data(wire)
    assert isinstance(events[0], StreamRejected)
    assert (events[0].stream_id, events[0].code) == (3, Code.RESOURCE_EXHAUSTED)
    assert isinstance(events[1], RequestReceived) and events[1].stream_id == 5


def test_server_ignores_unknown_types_and_non_request_frames() -> None:
    proto = ServerProtocol()
    wire = (
        encode_frame(1, 0x7F, b"from the future")
        + encode_frame(1, FrameType.DATA, b"stream data")
        + encode_frame(1, FrameType.RESPONSE, b"")
        + request_frame(1, "Pids")
    )
    (event,) = proto.receive_data(wire)
    assert isinstance(event, RequestReceived)
    assert event.request.method == "Pids"


def test_server_rejects_even_stream_ids_with_invalid_argument() -> None:
    proto = ServerProtocol()
    events = proto.receive_data(request_frame(2) + request_frame(0) + request_frame(3))
    assert [(type(e), e.stream_id) for e in events] == [
        (StreamRejected, 2),
        (StreamRejected, 0),
        (RequestReceived, 3),
    ]
    assert events[0].code == Code.INVALID_ARGUMENT


def test_server_rejects_undecodable_request() -> None:
    proto = ServerProtocol()
    (event,) = proto.receive_data(encode_frame(1, FrameType.REQUEST, b"\xff\xff\xff"))
    assert isinstance(event, StreamRejected) and event.code == Code.INVALID_ARGUMENT


def test_request_payload_round_trip_with_metadata_and_timeout() -> None:
    req = ttrpc_pb2.Request(service="s.S", method="M", payload=b"\x08\x01", timeout_nano=5_000_000)
    req.metadata.add(key="containerd-namespace-ttrpc", value="default")
    client = ClientProtocol()
    sid = client.next_stream_id()
    (event,) = ServerProtocol().receive_data(client.encode_request(sid, req))
    assert event.request == req and event.stream_id == 1


def test_client_stream_ids_are_odd_and_increasing() -> None:
    client = ClientProtocol()
    assert [client.next_stream_id() for _ in range(4)] == [1, 3, 5, 7]


def test_client_decodes_responses_and_flags_oversized_ones() -> None:
    client = ClientProtocol(max_payload=64)
    wire = (
        encode_response(1, Code.OK, "", b"payload")
        + encode_frame(3, FrameType.REQUEST, b"ignored")
        + struct.pack(">IIBB", 65, 5, FrameType.RESPONSE, 0)
        + b"z" * 65
        + encode_response(7, Code.NOT_FOUND, "gone")
    )
    events = client.receive_data(wire)
    assert isinstance(events[0], ResponseReceived) and events[0].response.payload == b"payload"
    assert isinstance(events[1], StreamFailed) and events[1].code == Code.RESOURCE_EXHAUSTED
    assert events[1].stream_id == 5
    assert isinstance(events[2], ResponseReceived) and events[2].response.status.code == 5
    assert events[2].response.status.message == "gone"


def test_oversized_response_becomes_an_error_answer() -> None:
    data = encode_response(11, Code.OK, "", b"\0" * MAX_PAYLOAD)
    (event,) = ClientProtocol().receive_data(data)
    assert event.response.status.code == Code.RESOURCE_EXHAUSTED and event.stream_id == 11


def test_any_split_of_a_stream_decodes_to_the_same_frames() -> None:
    rng = random.Random(7)
    frames = [
        Frame(2 * i + 1, rng.choice((1, 2, 3, 9)), rng.randrange(8), rng.randbytes(rng.randrange(0, 3000)))
        for i in range(60)
    ]
    wire = b"".join(encode_frame(f.stream_id, f.type, f.payload, f.flags) for f in frames)
    for _ in range(20):
        dec, got, pos = FrameDecoder(), [], 0
        while pos < len(wire):
            step = rng.choice((1, 2, 9, 10, 11, 500, 4096))
            got += dec.feed(wire[pos : pos + step])
            pos += step
        assert got == frames
