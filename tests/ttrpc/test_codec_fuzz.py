"""Property-based fuzzing of the ttrpc frame decoder and protocols: any byte stream, split anywhere,
yields the same events or nothing, never an exception, and never buffers more than one frame."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim.ttrpc.codec import HEADER, HEADER_SIZE, ClientProtocol, FrameDecoder, ServerProtocol

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
LIMIT = 256  # a small payload limit so oversized frames are common

# Mostly well-formed frames (any type, stream id, flags, payload bytes, lying lengths), or raw noise.
frames = st.builds(
    lambda length, sid, typ, flags, payload: HEADER.pack(length, sid, typ, flags) + payload,
    st.integers(0, 2 * LIMIT) | st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 255) | st.sampled_from([1, 2, 3]),
    st.integers(0, 255),
    st.binary(max_size=2 * LIMIT),
)
streams = st.lists(frames | st.binary(max_size=40), max_size=8).map(b"".join)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def _events(proto_cls, pieces: list[bytes]) -> list:
    proto = proto_cls(max_payload=LIMIT)
    out = []
    for piece in pieces:
        out += proto.receive_data(piece)
        assert proto._decoder.buffered <= HEADER_SIZE + LIMIT
    return out


@FUZZ
@given(data=streams, cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_frame_decoder_is_split_invariant_and_bounded(data: bytes, cuts: list[int]) -> None:
    whole = FrameDecoder(LIMIT).feed(data)
    dec = FrameDecoder(LIMIT)
    parts = []
    for piece in _split(data, cuts):
        parts += dec.feed(piece)
        assert dec.buffered <= HEADER_SIZE + LIMIT
    assert parts == whole
    assert all(len(f.payload) <= LIMIT for f in whole if hasattr(f, "payload"))


@FUZZ
@given(data=streams, cuts=st.lists(st.integers(0, 10_000), max_size=6))
def test_protocols_never_raise_on_any_stream(data: bytes, cuts: list[int]) -> None:
    for proto in (ServerProtocol, ClientProtocol):
        assert _events(proto, _split(data, cuts)) == _events(proto, [data])
