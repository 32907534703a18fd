"""A small ttrpc client for Arbiter, for integrators: frames, stream ids, deadlines,
metadata and status codes in plain Python (standard library + protobuf).

    client = Client("127.0.0.1", 7100, token=None)
    reply = client.call("grpc.health.v1.Health", "Check", health_pb2.HealthCheckRequest(),
                        health_pb2.HealthCheckResponse, timeout=1.0)

Many calls may be in flight on one connection: a reader thread matches answers to
calls by stream id. See PROTOCOL.md for the wire format.
"""
import socket
import struct
import threading

HEADER = struct.Struct(">IIBB")  # length, stream id, type, flags
REQUEST, RESPONSE = 1, 2

CODE_NAMES = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
              "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
              "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
              "UNAUTHENTICATED"]


class RPCError(Exception):
    """A non-OK answer: a gRPC status code and the server's message."""

    def __init__(self, code, message):
        super().__init__("%s: %s" % (self.name_of(code), message))
        self.code = code
        self.message = message

    @property
    def name(self):
        return self.name_of(self.code)

    @staticmethod
    def name_of(code):
        return CODE_NAMES[code] if 0 <= code < len(CODE_NAMES) else "CODE_%d" % code


class Client:
    def __init__(self, host, port, token=None, ttrpc_pb2=None, connect_timeout=2.0):
        if ttrpc_pb2 is None:
            import ttrpc_pb2 as module  # generated from Protos/ttrpc.proto
            ttrpc_pb2 = module
        self._pb = ttrpc_pb2
        self._token = token
        try:
            self._sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as error:
            raise RPCError(14, "cannot connect to %s:%d: %s" % (host, port, error))
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()
        self._next_id = 1
        self._pending = {}  # stream id -> [event, response or error]
        self._closed = None
        threading.Thread(target=self._read_loop, daemon=True).start()

    def close(self):
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def call(self, service, method, request, response_type, timeout=None, metadata=()):
        """Calls service/method; returns a response_type message or raises RPCError."""
        envelope = self._pb.Request(service=service, method=method, payload=request.SerializeToString())
        if timeout is not None:
            envelope.timeout_nano = max(1, int(timeout * 1e9))
        pairs = list(metadata)
        if self._token:
            pairs.append(("authorization", "Bearer " + self._token))
        for key, value in pairs:
            envelope.metadata.add(key=key.lower(), value=value)
        body = envelope.SerializeToString()
        slot = [threading.Event(), None]
        with self._lock:
            if self._closed:
                raise RPCError(14, "connection closed: %s" % self._closed)
            stream = self._next_id
            self._next_id += 2  # client streams are odd and increasing
            self._pending[stream] = slot
            self._sock.sendall(HEADER.pack(len(body), stream, REQUEST, 0) + body)
        # Wait a little longer than the deadline, so that the server's answer is the one seen.
        if not slot[0].wait(None if timeout is None else timeout + 1.0):
            with self._lock:
                self._pending.pop(stream, None)
            raise RPCError(4, "no answer within the deadline")
        answer = slot[1]
        if isinstance(answer, RPCError):
            raise answer
        if answer.HasField("status") and answer.status.code != 0:
            raise RPCError(answer.status.code, answer.status.message)
        reply = response_type()
        reply.ParseFromString(answer.payload)
        return reply

    def _read_exactly(self, n):
        data = b""
        while len(data) < n:
            chunk = self._sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the server")
            data += chunk
        return data

    def _read_loop(self):
        try:
            while True:
                length, stream, kind, _ = HEADER.unpack(self._read_exactly(HEADER.size))
                payload = self._read_exactly(length)
                if kind != RESPONSE:
                    continue
                response = self._pb.Response()
                response.ParseFromString(payload)
                with self._lock:
                    slot = self._pending.pop(stream, None)
                if slot:
                    slot[1] = response
                    slot[0].set()
        except (OSError, ConnectionError) as error:
            with self._lock:
                self._closed = str(error) or "closed"
                pending, self._pending = self._pending, {}
            for slot in pending.values():  # every waiting call fails; none hangs
                slot[1] = RPCError(14, "connection lost: %s" % self._closed)
                slot[0].set()
