"""The hex test vectors of ../shared/spec/wire-protocol.md, both directions."""

import struct

import pytest

import agent


def h(text):
    return bytes.fromhex(text)


PING_REQ = h("00 00 00 12 00 00 00 01 00 00 0a 04 70 69 6e 67 10 80 ea cc d1 06")
PING_REQ_TRACE = h("00 00 00 15 00 00 00 01 00 03 61 62 63 0a 04 70 69 6e 67 10 80 ea cc d1 06")
PING_RESP = h("00 00 00 19 00 00 10 01 00 00 0a 0a 70 6f 6e 67 3a 20 70 69 6e 67 12 05 30 2e 34"
              " 2e 39")
SHUTDOWN_25 = h("00 00 00 08 00 00 00 0a 00 00 08 19")
SHUTDOWN_0 = h("00 00 00 06 00 00 00 0a 00 00")
SHUTDOWN_RESP = h("00 00 00 08 00 00 10 0a 00 00 08 01")
GET_INFO = h("00 00 00 06 00 00 00 02 00 00")
ERROR_400 = h("00 00 00 20 00 00 ff ff 00 00 00 00 01 90 00 00 00 12"
              "69 6e 76 61 6c 69 64 20 72 65 71 75 65 73 74 3a 20 78")
SYSINFO_PAYLOAD = h(
    "0a 06 36 2e 31 32 2e 30 12 05 4c 69 6e 75 78 1a 06 23 31 20 53 4d 50"
    "22 07 61 61 72 63 68 36 34 28 80 80 80 80 10 30 80 80 80 80 0c 38 04"
    "42 18 9a 99 99 99 99 99 b9 3f 9a 99 99 99 99 99 a9 3f 7b 14 ae 47 e1 7a 84 3f"
    "4a 06 61 72 63 62 6f 78 50 2a 5a 09 31 30 2e 30 2e 32 2e 31 35")
SYSINFO = {
    "kernel_version": "6.12.0", "os_name": "Linux", "os_version": "#1 SMP", "arch": "aarch64",
    "total_memory": 4 << 30, "available_memory": 3 << 30, "cpu_count": 4,
    "load_average": [0.1, 0.05, 0.01], "hostname": "arcbox", "uptime": 42,
    "ip_addresses": ["10.0.2.15"],
}


def decode_one(data):
    msg_type, trace, payload, consumed = agent.decode_frame(data, 1 << 20)
    assert consumed == len(data)
    return msg_type, trace, payload


def test_ping_request_encodes_to_vector():
    payload = agent.encode_message(agent.PING_REQUEST, {"message": "ping",
                                                        "timestamp_secs": 1781740800})
    assert agent.encode_frame(agent.MSG_PING, payload) == PING_REQ
    assert agent.encode_frame(agent.MSG_PING, payload, b"abc") == PING_REQ_TRACE


@pytest.mark.parametrize("frame,trace", [(PING_REQ, b""), (PING_REQ_TRACE, b"abc")])
def test_ping_request_decodes_from_vector(frame, trace):
    msg_type, got_trace, payload = decode_one(frame)
    assert (msg_type, got_trace) == (agent.MSG_PING, trace)
    assert agent.decode_message(agent.PING_REQUEST, payload) == {
        "message": "ping", "timestamp_secs": 1781740800}


def test_ping_response_both_directions():
    payload = agent.encode_message(agent.PING_RESPONSE, {"message": "pong: ping",
                                                         "version": "0.4.9"})
    assert agent.encode_frame(agent.MSG_PING | agent.RESPONSE_BIT, payload) == PING_RESP
    msg_type, _, payload = decode_one(PING_RESP)
    assert msg_type == 0x1001
    assert agent.decode_message(agent.PING_RESPONSE, payload) == {"message": "pong: ping",
                                                                  "version": "0.4.9"}


@pytest.mark.parametrize("frame,timeout", [(SHUTDOWN_25, 25), (SHUTDOWN_0, 0)])
def test_shutdown_request_both_directions(frame, timeout):
    payload = agent.encode_message(agent.SHUTDOWN_REQUEST, {"timeout_seconds": timeout})
    assert agent.encode_frame(agent.MSG_SHUTDOWN, payload) == frame
    msg_type, _, payload = decode_one(frame)
    assert msg_type == agent.MSG_SHUTDOWN
    assert agent.decode_message(agent.SHUTDOWN_REQUEST, payload) == {"timeout_seconds": timeout}


def test_shutdown_response_both_directions():
    payload = agent.encode_message(agent.SHUTDOWN_RESPONSE, {"accepted": True})
    assert agent.encode_frame(0x100A, payload) == SHUTDOWN_RESP
    assert agent.decode_message(agent.SHUTDOWN_RESPONSE, decode_one(SHUTDOWN_RESP)[2]) == {
        "accepted": True}


def test_get_system_info_request_both_directions():
    assert agent.encode_frame(agent.MSG_GET_SYSTEM_INFO) == GET_INFO
    assert decode_one(GET_INFO) == (agent.MSG_GET_SYSTEM_INFO, b"", b"")


def test_error_frame_both_directions():
    assert agent.encode_frame(agent.MSG_ERROR, agent.encode_error(400, "invalid request: x")) \
        == ERROR_400
    msg_type, _, payload = decode_one(ERROR_400)
    assert msg_type == 0xFFFF
    assert agent.decode_error(payload) == (400, "invalid request: x")


def test_system_info_payload_both_directions():
    assert agent.encode_message(agent.SYSTEM_INFO, SYSINFO) == SYSINFO_PAYLOAD
    assert agent.decode_message(agent.SYSTEM_INFO, SYSINFO_PAYLOAD) == SYSINFO


def test_load_average_is_packed_little_endian_doubles():
    payload = agent.encode_message(agent.SYSTEM_INFO, {"load_average": [1.5]})
    assert payload == b"\x42\x08" + struct.pack("<d", 1.5)


def test_handle_request_answers_the_ping_vector_like_the_rust_agent(monkeypatch):
    clock = []
    monkeypatch.setattr(agent.time, "clock_settime", lambda which, t: clock.append(t))
    policy = agent.RequestPolicy(agent.default_config()["allow"], True, True)
    _, _, payload = decode_one(PING_REQ)
    rtype, rpayload, effect = agent.handle_request(agent.MSG_PING, payload, ("vsock", 2, 99),
                                                   policy)
    assert effect == ("Ping", 1781740800)  # the host (CID 2) sets PID 1's clock: the agent
    assert clock == []                      # applies the effect; handle_request changes nothing
    assert rtype == 0x1001
    assert agent.decode_message(agent.PING_RESPONSE, rpayload) == {
        "message": "pong: ping", "version": agent.__version__}
    rtype, rpayload, _ = agent.handle_request(agent.MSG_PING, b"", ("unix", 1, 0, 0), policy)
    assert agent.decode_message(agent.PING_RESPONSE, rpayload)["message"] == "pong"
    # Never field 3 (protocol_version): newer hosts would demand duties we do not have.
    assert {f for f, _, _ in agent.iter_fields(rpayload)} == {1, 2}
