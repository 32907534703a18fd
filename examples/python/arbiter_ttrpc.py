"""A small ttrpc client for Arbiter, for integrators: frames, stream ids, deadlines,
metadata and status codes in plain Python (standard library + protobuf).

    import generated; generated.load()        # protoc --python_out, on sys.path
    import health_pb2
    from arbiter_ttrpc import Client, RPCError

    with Client.connect("127.0.0.1:7100", token=None) as client:
        reply = client.call("grpc.health.v1.Health", "Check", health_pb2.HealthCheckRequest(),
                            health_pb2.HealthCheckResponse, timeout=1.0)

The wire (PROTOCOL.md): every frame is a 10-byte header, big-endian
(payload length u32, stream id u32, type u8, flags u8), then a protobuf payload:
a ttrpc.Request (type 1) from the client, a ttrpc.Response (type 2) from the server.
Stream ids are odd and increasing (1, 3, 5, ...). Many calls may be in flight on one
connection: a reader thread hands each answer to the call waiting on its stream id.
"""
import socket
import struct
import threading

HEADER = struct.Struct(">IIBB")  # payload length, stream id, frame type, flags
REQUEST, RESPONSE = 1, 2
MAX_STREAM_ID = 2**32 - 1

# gRPC status codes (google.rpc.Code).
CODE_NAMES = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND", 6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION", 10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED",
    13: "INTERNAL", 14: "UNAVAILABLE", 15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}
CODES = {name: code for code, name in CODE_NAMES.items()}  # "NOT_FOUND" -> 5


def code_name(code):
    return CODE_NAMES.get(code, "CODE_%d" % code)


class RPCError(Exception):
    """A call that did not succeed: a gRPC status code and a message.

    `local` is False when the server sent the status, True when this client made it
    up (the connection failed, or no answer came in time)."""

    def __init__(self, code, message, local=False):
        super().__init__("%s: %s" % (code_name(code), message))
        self.code = code
        self.message = message
        self.local = local

    @property
    def name(self):
        return code_name(self.code)


class ConnectionFailed(RPCError):
    """The server is unreachable, or the connection broke (UNAVAILABLE, raised by the
    client). Every call waiting on the connection fails with it; open a new Client."""

    def __init__(self, message):
        super().__init__(CODES["UNAVAILABLE"], message, local=True)


class _Pending:
    __slots__ = ("done", "response", "error")

    def __init__(self):
        self.done = threading.Event()
        self.response = None  # a ttrpc_pb2.Response
        self.error = None     # a ConnectionFailed


class Client:
    """One TCP connection to one Arbiter server; safe to share between threads.

    token: when set, every call carries `authorization: Bearer <token>`.
    deadline_grace: how much longer than `timeout` a call waits for the server's own
    DEADLINE_EXCEEDED before giving up locally (RPCError with local=True)."""

    def __init__(self, host, port, token=None, connect_timeout=5.0, deadline_grace=1.0, ttrpc_pb2=None):
        if ttrpc_pb2 is None:
            import ttrpc_pb2  # generated from Protos/ttrpc.proto (see generated.py)
        self._pb = ttrpc_pb2
        self._token = token
        self.deadline_grace = deadline_grace
        self.address = "%s:%s" % (host, port)
        try:
            self._sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as error:
            raise ConnectionFailed("cannot connect to %s: %s" % (self.address, error)) from None
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._write_lock = threading.Lock()  # one frame at a time on the socket; taken before _lock
        self._lock = threading.Lock()        # guards _next_id, _pending, _closed
        self._next_id = 1
        self._pending = {}                   # stream id -> _Pending
        self._closed = None                  # why the connection is gone, once it is
        self._reader = threading.Thread(target=self._read_loop, name="ttrpc-reader " + self.address, daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, address, **kwargs):
        """Client.connect("host:port") or "[::1]:port"."""
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("address must be host:port, got %r" % address)
        return cls(host.strip("[]"), int(port), **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Closes the connection; calls still waiting fail with ConnectionFailed."""
        with self._lock:
            if self._closed is None:
                self._closed = "closed by the client"
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=5)

    def call(self, service, method, request_msg, response_cls, timeout=None, metadata=None):
        """Calls service/method and returns a response_cls message.

        timeout: seconds; sent as timeout_nano so the server enforces it (None = no deadline,
                 0 or less = already expired).
        metadata: a dict (value: str or list of str) or an iterable of (key, value) pairs.
        Raises RPCError for a non-OK status, ConnectionFailed when the connection fails."""
        envelope = self._pb.Request(service=service, method=method, payload=request_msg.SerializeToString())
        if timeout is not None:
            # Remaining budget in ns; a negative value tells the server it has already expired.
            envelope.timeout_nano = int(timeout * 1e9) if timeout > 0 else -1
        pairs = _pairs(metadata)
        if self._token and not any(key == "authorization" for key, _ in pairs):
            pairs.append(("authorization", "Bearer " + self._token))
        for key, value in pairs:
            envelope.metadata.add(key=key, value=value)
        payload = envelope.SerializeToString()

        pending = _Pending()
        try:
            # Ids must reach the server in increasing order: take one and send under one lock.
            with self._write_lock:
                with self._lock:
                    if self._closed is not None:
                        raise ConnectionFailed("connection to %s is closed (%s)" % (self.address, self._closed))
                    stream = self._next_id
                    if stream > MAX_STREAM_ID:
                        raise ConnectionFailed("stream ids exhausted on this connection; open a new one")
                    self._next_id += 2  # client-initiated streams are odd and increasing: 1, 3, 5, ...
                    self._pending[stream] = pending
                self._sock.sendall(HEADER.pack(len(payload), stream, REQUEST, 0) + payload)
        except OSError as error:
            self._fail_all("write failed: %s" % error)  # fails this call and every other waiting one

        # Wait a little longer than the deadline, so that the answer seen is the server's.
        wait = None if timeout is None else max(timeout, 0) + self.deadline_grace
        if not pending.done.wait(wait):
            with self._lock:
                self._pending.pop(stream, None)
            raise RPCError(CODES["DEADLINE_EXCEEDED"],
                           "no answer from %s within %.3f s" % (self.address, wait), local=True)
        if pending.error is not None:
            raise pending.error
        status = pending.response.status
        if status.code != 0:
            raise RPCError(status.code, status.message)
        reply = response_cls()
        reply.ParseFromString(pending.response.payload)
        return reply

    # -- connection internals --------------------------------------------------------

    def _send_frame(self, frame):
        """Writes one raw frame (for tests that need to send something unusual)."""
        with self._write_lock:
            self._sock.sendall(frame)

    def _read_exactly(self, n):
        chunks, left = [], n
        while left:
            chunk = self._sock.recv(min(left, 1 << 16))
            if not chunk:
                raise EOFError("closed by the server")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _read_loop(self):
        reason = "reader stopped"
        try:
            while True:
                length, stream, kind, _flags = HEADER.unpack(self._read_exactly(HEADER.size))
                payload = self._read_exactly(length)
                if kind != RESPONSE:
                    continue  # nothing else is meant for a client; skip it
                response = self._pb.Response()
                response.ParseFromString(payload)
                with self._lock:
                    pending = self._pending.pop(stream, None)
                if pending is not None:  # None: a call that already gave up
                    pending.response = response
                    pending.done.set()
        except EOFError as error:
            reason = str(error)
        except OSError as error:
            reason = "read failed: %s" % error
        except Exception as error:  # e.g. a Response that does not decode
            reason = "protocol error: %r" % error
        finally:
            self._fail_all(reason)

    def _fail_all(self, reason):
        """Marks the connection dead and fails every waiting call: none hangs."""
        with self._lock:
            if self._closed is None:
                self._closed = reason
            reason = self._closed
            pending, self._pending = self._pending, {}
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader if a write failed
        except OSError:
            pass
        for call in pending.values():
            call.error = ConnectionFailed("connection to %s lost: %s" % (self.address, reason))
            call.done.set()


def _pairs(metadata):
    if metadata is None:
        return []
    items = metadata.items() if hasattr(metadata, "items") else metadata
    pairs = []
    for key, value in items:
        for one in ([value] if isinstance(value, str) else value):
            pairs.append((key.lower(), one))  # ttrpc metadata keys are lower-case
    return pairs
