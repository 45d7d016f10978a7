"""proto3 and frame corner cases, and property tests: round trips, and no byte string makes
a decoder raise anything but ProtocolError."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agent

MAX = 1 << 20


def key(field, wire):
    return agent.encode_varint(field << 3 | wire)


# ---- unknown fields of every wire type are skipped -------------------------------------------

@pytest.mark.parametrize("unknown", [
    key(9, 0) + agent.encode_varint(300),                       # varint
    key(9, 1) + b"\x01" * 8,                                    # fixed64
    key(9, 2) + b"\x03abc",                                     # length-delimited
    key(9, 5) + b"\x01" * 4,                                    # fixed32
    key(9, 3) + key(1, 0) + b"\x05" + key(9, 4),                # group, with a field inside
    key(9, 3) + key(8, 3) + key(8, 4) + key(9, 4),              # nested groups
], ids=["varint", "fixed64", "len", "fixed32", "group", "nested-group"])
def test_unknown_fields_are_skipped(unknown):
    known = agent.encode_message(agent.PING_REQUEST, {"message": "hi", "timestamp_secs": 7})
    for data in (unknown + known, known + unknown):
        assert agent.decode_message(agent.PING_REQUEST, data) == {"message": "hi",
                                                                  "timestamp_secs": 7}


def test_negative_int64_is_a_ten_byte_varint_and_round_trips():
    payload = agent.encode_message(agent.PING_REQUEST, {"timestamp_secs": -1})
    assert payload == key(2, 0) + b"\xff" * 9 + b"\x01"
    assert agent.decode_message(agent.PING_REQUEST, payload)["timestamp_secs"] == -1


def test_uint32_truncates_like_protobuf():
    payload = key(1, 0) + agent.encode_varint((1 << 32) + 5)
    assert agent.decode_message(agent.SHUTDOWN_REQUEST, payload) == {"timeout_seconds": 5}


def test_last_value_of_a_repeated_scalar_field_wins():
    payload = key(1, 0) + b"\x05" + key(1, 0) + b"\x07"
    assert agent.decode_message(agent.SHUTDOWN_REQUEST, payload) == {"timeout_seconds": 7}


def test_unpacked_doubles_are_accepted_too():
    payload = key(8, 1) + struct.pack("<d", 0.5) + key(8, 1) + struct.pack("<d", 2.0)
    assert agent.decode_message(agent.SYSTEM_INFO, payload)["load_average"] == [0.5, 2.0]


@pytest.mark.parametrize("data,why", [
    (b"\x80", "truncated varint"),
    (key(2, 0) + b"\xff\xff", "truncated varint"),
    (key(2, 0) + b"\xff" * 11, "longer than 10"),
    (key(1, 2) + b"\x05ab", "overruns"),
    (key(9, 1) + b"\x00" * 3, "truncated fixed64"),
    (key(9, 5) + b"\x00", "truncated fixed32"),
    (key(9, 3) + key(1, 0) + b"\x01", "not closed"),
    (key(9, 3) + key(8, 4), "closed by end-group"),
    (key(9, 6), "wire type 6"),
    (key(9, 4), "wire type 4"),
    (b"\x00", "field number 0"),
    (key(1, 0) + b"\x01", "wire type 0, expected 2"),     # message must be a string
    (key(1, 2) + b"\x02\xff\xfe", "UTF-8"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_malformed_payloads_raise_protocol_error(data, why):
    with pytest.raises(agent.ProtocolError, match=why):
        agent.decode_message(agent.PING_REQUEST, data)


def test_packed_doubles_must_be_whole():
    with pytest.raises(agent.ProtocolError, match="multiple of 8"):
        agent.decode_message(agent.SYSTEM_INFO, key(8, 2) + b"\x03abc")


def test_deeply_nested_groups_are_bounded():
    data = key(9, 3) * 100000
    with pytest.raises(agent.ProtocolError, match="nested too deeply"):
        agent.decode_message(agent.PING_REQUEST, data)


# ---- frames ------------------------------------------------------------------------------------

def test_partial_frames_need_more_bytes():
    frame = agent.encode_frame(agent.MSG_PING, b"\x0a\x01x", b"t")
    for cut in range(len(frame)):
        assert agent.decode_frame(frame[:cut], MAX) is None
    assert agent.decode_frame(frame + b"\x00", MAX)[3] == len(frame)


def test_oversized_length_is_fatal_as_soon_as_the_length_is_known():
    with pytest.raises(agent.ProtocolError) as err:
        agent.decode_frame(b"\x7f\xff\xff\xff", MAX)      # no type yet, nothing allocated
    assert err.value.fatal and "exceeds the limit" in str(err.value)


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_length_too_short_for_a_type_is_fatal(length):
    with pytest.raises(agent.ProtocolError) as err:
        agent.decode_frame(struct.pack(">I", length) + b"\x00" * 8, MAX)
    assert err.value.fatal


@pytest.mark.parametrize("length,payload", [(4, b""), (5, b"\x07")])
def test_short_frames_without_trace_field_carry_the_rest_as_payload(length, payload):
    data = struct.pack(">II", length, agent.MSG_PING) + payload
    assert agent.decode_frame(data, MAX) == (agent.MSG_PING, b"", payload, len(data))


def test_trace_overrun_is_not_fatal_and_skips_exactly_one_frame():
    bad = struct.pack(">IIH", 7, agent.MSG_PING, 50) + b"x"
    with pytest.raises(agent.ProtocolError) as err:
        agent.decode_frame(bad + agent.encode_frame(agent.MSG_PING), MAX)
    assert not err.value.fatal and err.value.consumed == len(bad)


def test_error_payload_decoding_is_lenient_but_checked():
    assert agent.decode_error(struct.pack(">iI", -1, 99) + b"short") == (-1, "short")
    with pytest.raises(agent.ProtocolError):
        agent.decode_error(b"\x00\x00")


# ---- properties ----------------------------------------------------------------------------------

texts = st.text(max_size=40)
u64 = st.integers(0, (1 << 64) - 1)
finite = st.floats(allow_nan=False)

system_infos = st.fixed_dictionaries({
    "kernel_version": texts, "os_name": texts, "os_version": texts, "arch": texts,
    "total_memory": u64, "available_memory": u64, "cpu_count": st.integers(0, (1 << 32) - 1),
    "load_average": st.lists(finite, max_size=4), "hostname": texts, "uptime": u64,
    "ip_addresses": st.lists(texts, max_size=4),
})


@given(system_infos)
def test_system_info_round_trips(info):
    assert agent.decode_message(agent.SYSTEM_INFO, agent.encode_message(agent.SYSTEM_INFO, info)) \
        == info


@given(texts, st.integers(-(1 << 63), (1 << 63) - 1))
def test_ping_request_round_trips(message, stamp):
    values = {"message": message, "timestamp_secs": stamp}
    assert agent.decode_message(agent.PING_REQUEST,
                                agent.encode_message(agent.PING_REQUEST, values)) == values


@given(st.integers(0, (1 << 32) - 1), st.binary(max_size=300), st.binary(max_size=300))
def test_frames_round_trip(msg_type, trace, payload):
    frame = agent.encode_frame(msg_type, payload, trace)
    assert agent.decode_frame(frame, MAX) == (msg_type, trace, payload, len(frame))


@given(st.integers(-(1 << 31), (1 << 31) - 1), st.text(max_size=100))
def test_error_payload_round_trips(code, message):
    assert agent.decode_error(agent.encode_error(code, message)) == (code, message)


SCHEMAS = [agent.PING_REQUEST, agent.PING_RESPONSE, agent.SYSTEM_INFO, agent.SHUTDOWN_REQUEST,
           agent.SHUTDOWN_RESPONSE]


@settings(max_examples=1500)
@given(st.binary(max_size=200), st.sampled_from(SCHEMAS))
def test_no_payload_makes_the_decoder_raise_anything_but_protocol_error(data, schema):
    try:
        agent.decode_message(schema, data)
    except agent.ProtocolError:
        pass


@settings(max_examples=1500)
@given(st.binary(max_size=200), st.integers(64, 1 << 20))
def test_no_byte_string_makes_the_frame_decoder_raise_anything_but_protocol_error(data, limit):
    try:
        result = agent.decode_frame(data, limit)
    except agent.ProtocolError:
        return
    if result is not None:
        assert 8 <= result[3] <= len(data)
