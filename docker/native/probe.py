#!/usr/bin/env python3
"""Readiness probes for docker/native/services: one real protocol call per service.

Standard library only (no client packages to install), so `services status` stays fast.

    probe.py kafka HOST:PORT       Kafka ApiVersions + Metadata: the broker is registered and unfenced
    probe.py cql HOST:PORT         CQL STARTUP + SELECT release_version FROM system.local
    probe.py hdfs HOST:PORT        Hadoop RPC to the NameNode (ClientProtocol): live DataNodes >= 1
                                   and safe mode off

Prints a one-line summary and exits 0 when the service is ready, prints the reason and
exits 1 otherwise.
"""

import os
import socket
import struct
import sys
import uuid

TIMEOUT = float(os.environ.get("SPENDFLOW_PROBE_TIMEOUT", "3"))


class NotReady(Exception):
    pass


def connect(addr):
    host, port = addr.rsplit(":", 1)
    try:
        return socket.create_connection((host, int(port)), timeout=TIMEOUT)
    except OSError as e:
        raise NotReady(f"cannot connect to {addr}: {e.strerror or e}")


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise NotReady("connection closed by the server")
        buf += chunk
    return bytes(buf)


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise NotReady("truncated response")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def i8(self):
        return self.unpack(">b")

    def i16(self):
        return self.unpack(">h")

    def i32(self):
        return self.unpack(">i")

    def short_string(self):  # int16 length, -1 = null
        n = self.i16()
        return None if n < 0 else self.take(n).decode()

    def varint(self):
        shift = result = 0
        while True:
            b = self.take(1)[0]
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7


# ----------------------------------------------------------------------------------------------
# Kafka


def kafka_call(sock, api_key, version, corr, body):
    client_id = b"spendflow-probe"
    header = struct.pack(">hhih", api_key, version, corr, len(client_id)) + client_id
    msg = header + body
    sock.sendall(struct.pack(">i", len(msg)) + msg)
    size = struct.unpack(">i", recv_exact(sock, 4))[0]
    r = Reader(recv_exact(sock, size))
    if r.i32() != corr:
        raise NotReady("correlation id mismatch")
    return r


def probe_kafka(addr):
    with connect(addr) as s:
        # ApiVersions v0: every broker answers it; tells which Metadata versions it serves.
        r = kafka_call(s, 18, 0, 1, b"")
        err = r.i16()
        if err:
            raise NotReady(f"ApiVersions error code {err}")
        versions = {}
        for _ in range(r.i32()):
            key, lo, hi = r.i16(), r.i16(), r.i16()
            versions[key] = (lo, hi)
        lo, hi = versions.get(3, (0, -1))
        v = max(lo, 4)
        if v > min(hi, 8):  # v4..v8 share the non-flexible layout parsed below
            raise NotReady(f"broker serves Metadata v{lo}-v{hi}, probe speaks v4-v8")
        # Metadata: no topics (empty array), don't auto-create.
        body = struct.pack(">i", 0) + struct.pack(">b", 0)
        if v >= 8:
            body += struct.pack(">bb", 0, 0)  # include cluster/topic authorized operations
        r = kafka_call(s, 3, v, 2, body)
        r.i32()  # throttle_time_ms
        brokers = []
        for _ in range(r.i32()):
            node, host, port = r.i32(), r.short_string(), r.i32()
            r.short_string()  # rack
            brokers.append(f"{node}@{host}:{port}")
        cluster_id = r.short_string()
        controller = r.i32()
    if not brokers:
        raise NotReady("metadata lists no live broker yet")
    if controller < 0:
        raise NotReady("no active controller yet")
    return f"brokers {','.join(brokers)}, controller {controller}, cluster {cluster_id}"


# ----------------------------------------------------------------------------------------------
# Cassandra (CQL native protocol v4)


def cql_string(s):
    b = s.encode()
    return struct.pack(">H", len(b)) + b


def cql_call(sock, stream, opcode, body):
    sock.sendall(struct.pack(">BBhBi", 0x04, 0, stream, opcode, len(body)) + body)
    _ver, _flags, _stream, op, length = struct.unpack(">BBhBi", recv_exact(sock, 9))
    r = Reader(recv_exact(sock, length))
    if op == 0x00:  # ERROR
        code = r.i32()
        raise NotReady(f"CQL error 0x{code:04x}: {r.short_string()}")
    return op, r


def probe_cql(addr):
    with connect(addr) as s:
        op, _ = cql_call(s, 1, 0x01, struct.pack(">H", 1) + cql_string("CQL_VERSION") + cql_string("3.0.0"))
        if op != 0x02:  # READY (0x03 would be AUTHENTICATE: the kit runs without auth)
            raise NotReady(f"unexpected answer to STARTUP: opcode 0x{op:02x}")
        query = b"SELECT release_version FROM system.local"
        body = struct.pack(">i", len(query)) + query + struct.pack(">HB", 0x0001, 0)  # consistency ONE
        op, r = cql_call(s, 2, 0x07, body)
        if op != 0x08 or r.i32() != 2:  # RESULT / Rows
            raise NotReady("unexpected answer to QUERY")
        flags, ncols = r.i32(), r.i32()
        if flags & 0x0002:
            r.take(r.i32())  # paging state
        if not flags & 0x0004:  # metadata present
            glob = flags & 0x0001
            if glob:
                r.short_string(), r.short_string()
            for _ in range(ncols):
                if not glob:
                    r.short_string(), r.short_string()
                r.short_string()
                if r.i16() == 0x0000:  # custom type carries a class name
                    r.short_string()
        if r.i32() < 1:
            raise NotReady("system.local returned no row")
        n = r.i32()
        version = r.take(n).decode() if n >= 0 else "?"
    return f"Cassandra {version}"


# ----------------------------------------------------------------------------------------------
# HDFS (Hadoop IPC v9, protobuf RPC engine, SIMPLE auth)

CLIENT_PROTOCOL = "org.apache.hadoop.hdfs.protocol.ClientProtocol"


def pb_varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def pb_field(num, value):
    """Encode one field: int -> varint, bytes/str -> length-delimited."""
    if isinstance(value, int):
        return pb_varint(num << 3) + pb_varint(value)
    if isinstance(value, str):
        value = value.encode()
    return pb_varint(num << 3 | 2) + pb_varint(len(value)) + value


def pb_delimited(msg):
    return pb_varint(len(msg)) + msg


def zigzag(n):
    return (n << 1) ^ (n >> 31)


def pb_fields(data):
    """Decode the top-level fields of a message into {num: [values]} (ints or bytes)."""
    r, out = Reader(data), {}
    while r.pos < len(data):
        key = r.varint()
        num, wire = key >> 3, key & 7
        if wire == 0:
            val = r.varint()
        elif wire == 2:
            val = r.take(r.varint())
        elif wire == 1:
            val = r.take(8)
        elif wire == 5:
            val = r.take(4)
        else:
            raise NotReady(f"unsupported protobuf wire type {wire}")
        out.setdefault(num, []).append(val)
    return out


def hdfs_rpc_header(call_id, client_id):
    # RpcRequestHeaderProto: rpcKind=RPC_PROTOCOL_BUFFER(2), rpcOp=RPC_FINAL_PACKET(0), callId (sint32),
    # clientId, retryCount (sint32)
    return (pb_field(1, 2) + pb_field(2, 0) + pb_field(3, zigzag(call_id)) + pb_field(4, client_id)
            + pb_field(5, zigzag(-1 if call_id < 0 else 0)))


def hdfs_send(sock, *parts):
    data = b"".join(pb_delimited(p) for p in parts)
    sock.sendall(struct.pack(">I", len(data)) + data)


def hdfs_call(sock, call_id, client_id, method, request):
    req_header = pb_field(1, method) + pb_field(2, CLIENT_PROTOCOL) + pb_field(3, 1)
    hdfs_send(sock, hdfs_rpc_header(call_id, client_id), req_header, request)
    r = Reader(recv_exact(sock, struct.unpack(">I", recv_exact(sock, 4))[0]))
    header = pb_fields(r.take(r.varint()))
    if header.get(2, [1])[0] != 0:  # RpcStatusProto SUCCESS = 0
        exc = header.get(4, [b"?"])[0].decode()
        msg = header.get(5, [b""])[0].decode().splitlines()[:1]
        raise NotReady(f"{method} failed: {exc} {' '.join(msg)}")
    return pb_fields(r.take(r.varint()))


def probe_hdfs(addr):
    user = os.environ.get("HADOOP_USER_NAME") or os.environ.get("USER") or "root"
    client_id = uuid.uuid4().bytes
    with connect(addr) as s:
        s.sendall(b"hrpc" + bytes([9, 0, 0]))  # version 9, service class 0, auth SIMPLE (no SASL)
        context = pb_field(2, pb_field(1, user)) + pb_field(3, CLIENT_PROTOCOL)
        hdfs_send(s, hdfs_rpc_header(-3, client_id), context)
        live = hdfs_call(s, 0, client_id, "getDatanodeReport", pb_field(1, 2))  # LIVE
        datanodes = len(live.get(1, []))
        safe = hdfs_call(s, 1, client_id, "setSafeMode", pb_field(1, 3))  # SAFEMODE_GET
        in_safe_mode = bool(safe.get(1, [0])[0])
    if datanodes < 1:
        raise NotReady("NameNode is up but no DataNode is live yet")
    if in_safe_mode:
        raise NotReady("NameNode is in safe mode")
    return f"NameNode up, {datanodes} live DataNode(s), safe mode off"


PROBES = {"kafka": probe_kafka, "cql": probe_cql, "hdfs": probe_hdfs}


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in PROBES:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        print(PROBES[sys.argv[1]](sys.argv[2]))
        return 0
    except NotReady as e:
        print(e)
    except (OSError, struct.error, UnicodeDecodeError) as e:
        print(f"protocol error: {e}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
