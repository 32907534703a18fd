#!/usr/bin/python3
"""An integrator's walkthrough of Arbiter over ttrpc, against `arbiter-echo`:

  1. grpc.health.v1.Health/Check
  2. arbiter.echo.v1.Echo/Echo with metadata and a deadline
  3. a status error (the server fails the call with PERMISSION_DENIED)
  4. a deadline that expires (the server answers DEADLINE_EXCEEDED)

    /usr/bin/python3 examples/python/example.py --addr 127.0.0.1:7100 [--token T]

With --check it also asserts every result and more (unknown method, 50 calls in flight on
one connection, a dropped connection); --expect-auth adds calls without the token to a server
started with --auth-token-file (without --token, only those run). It prints PASS/FAIL lines
and exits 1 on a failure. CI runs it via scripts/example-python.sh.
"""
import argparse
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generated  # noqa: E402

generated.load()  # protoc --python_out into examples/python/gen, put on sys.path
import echo_pb2  # noqa: E402
import health_pb2  # noqa: E402
from arbiter_ttrpc import HEADER, Client, ConnectionFailed, RPCError  # noqa: E402

HEALTH, ECHO = "grpc.health.v1.Health", "arbiter.echo.v1.Echo"
SERVING = health_pb2.HealthCheckResponse.SERVING


# -- the walkthrough --------------------------------------------------------------------

def health(client, service=""):
    reply = client.call(HEALTH, "Check", health_pb2.HealthCheckRequest(service=service),
                        health_pb2.HealthCheckResponse, timeout=2.0)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def echo(client, timeout=2.0, metadata=None, **fields):
    return client.call(ECHO, "Echo", echo_pb2.EchoRequest(**fields), echo_pb2.EchoResponse,
                       timeout=timeout, metadata=metadata)


def walkthrough(client):
    """The four steps, printed; returns what they produced for --check."""
    seen = {}

    # 1. Health: open to every caller, even when the server requires a token.
    seen["health"] = health(client)
    print("1. health of %s: %s" % (client.address, seen["health"]))

    # 2. Echo with metadata and a 2 s deadline. The server sees the remaining budget.
    reply = echo(client, timeout=2.0, metadata=[("x-request-id", "py-1"), ("tenant", "acme")],
                 message="hello from Python", blob=b"\x00\x01\xfe\xff")
    seen["echo"] = reply
    print("2. echo: message %r, blob %r, metadata %s, deadline budget seen by the server %.3f s"
          % (reply.message, reply.blob, [(m.key, m.value) for m in reply.metadata],
             reply.deadline_remaining_nanos / 1e9))

    # 3. A status error: RPCError carries the gRPC code and the server's message.
    try:
        echo(client, fail_code=7, fail_message="not for you")
        seen["status_error"] = None
        print("3. status error: the call unexpectedly succeeded")
    except RPCError as error:
        seen["status_error"] = error
        print("3. status error: code %d %s, message %r" % (error.code, error.name, error.message))

    # 4. A deadline that expires: the handler would wait 2 s, the deadline is 0.3 s.
    #    The client waits a little longer than 0.3 s, so the answer is the server's.
    started = time.monotonic()
    try:
        echo(client, timeout=0.3, delay_ms=2000)
        seen["deadline"] = (None, time.monotonic() - started)
        print("4. deadline: the call unexpectedly succeeded")
    except RPCError as error:
        seen["deadline"] = (error, time.monotonic() - started)
        print("4. deadline: %s after %.3f s (%s)" % (error.name, seen["deadline"][1],
                                                     "from this client" if error.local else "from the server"))
    return seen


# -- the checks (--check) ---------------------------------------------------------------

failures = []


def check(condition, what, detail=""):
    print("%s %s%s" % ("PASS" if condition else "FAIL", what, "" if condition else "  [%s]" % detail))
    if not condition:
        failures.append(what)


def error_of(fn):
    try:
        fn()
    except RPCError as error:
        return error
    return None


def describe(error):
    return "no error" if error is None else "%s %r local=%s" % (error.name, error.message, error.local)


def run_checks(client, seen, args):
    host, port = args.addr.rsplit(":", 1)
    check(seen["health"] == "SERVING", "Health/Check('') is SERVING", seen["health"])

    reply = seen["echo"]
    check(reply.message == "hello from Python" and reply.blob == b"\x00\x01\xfe\xff",
          "Echo round-trips message and blob", "%r %r" % (reply.message, reply.blob))
    got = [(m.key, m.value) for m in reply.metadata]
    check(got == [("tenant", "acme"), ("x-request-id", "py-1")], "Echo returns the metadata sorted by key", got)
    check(0 < reply.deadline_remaining_nanos <= 2_000_000_000,
          "deadline_remaining_nanos is in (0, 2 s]", reply.deadline_remaining_nanos)

    # authorization is never echoed; equal keys keep their order. Without --token, send one anyway.
    metadata = [("b-key", "2"), ("a-key", "first"), ("a-key", "second")]
    if not args.token:
        metadata.append(("authorization", "Bearer not-checked"))
    got = [(m.key, m.value) for m in echo(client, metadata=metadata).metadata]
    check(got == [("a-key", "first"), ("a-key", "second"), ("b-key", "2")],
          "metadata echoed without authorization, stable for equal keys", got)
    check(echo(client, timeout=None).deadline_remaining_nanos == 0, "no deadline: deadline_remaining_nanos is 0")

    error = seen["status_error"]
    check(error is not None and error.name == "PERMISSION_DENIED" and error.message == "not for you"
          and not error.local, "fail_code=7 is PERMISSION_DENIED 'not for you'", describe(error))

    error, elapsed = seen["deadline"]
    check(error is not None and error.name == "DEADLINE_EXCEEDED" and not error.local and 0.25 <= elapsed < 1.0,
          "delay 2000 ms, timeout 0.3 s: DEADLINE_EXCEEDED from the server at ~0.3 s",
          "%s after %.3f s" % (describe(error), elapsed))
    error = error_of(lambda: echo(client, timeout=-1.0, message="late"))
    check(error is not None and error.name == "DEADLINE_EXCEEDED" and not error.local,
          "negative timeout_nano: DEADLINE_EXCEEDED at once", describe(error))

    error = error_of(lambda: client.call(ECHO, "Nope", echo_pb2.EchoRequest(), echo_pb2.EchoResponse, timeout=2))
    check(error is not None and error.name == "UNIMPLEMENTED" and error.message == "method Nope",
          "unknown method is UNIMPLEMENTED 'method Nope'", describe(error))
    error = error_of(lambda: client.call("no.such.Svc", "Ping", echo_pb2.EchoRequest(), echo_pb2.EchoResponse,
                                         timeout=2))
    check(error is not None and error.name == "UNIMPLEMENTED" and error.message == "service no.such.Svc",
          "unknown service is UNIMPLEMENTED 'service no.such.Svc'", describe(error))
    check(health(client, ECHO) == "SERVING", "Health/Check('%s') is SERVING" % ECHO)
    got = health(client, "no.such.Svc")
    check(got == "SERVICE_UNKNOWN", "Health/Check('no.such.Svc') is SERVICE_UNKNOWN", got)

    # 50 calls in flight on one connection; later calls wait less, so answers come back out of order.
    results, order, lock = {}, [], threading.Lock()

    def one(i):
        try:
            r = echo(client, timeout=5.0, message="m%d" % i, blob=bytes([i]) * i, delay_ms=(50 - i) * 4)
            results[i] = (r.message, r.blob)
        except RPCError as error:
            results[i] = describe(error)
        with lock:
            order.append(i)

    started = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    wrong = {i: results.get(i) for i in range(50) if results.get(i) != ("m%d" % i, bytes([i]) * i)}
    check(not wrong, "50 concurrent calls on one connection each get their own answer", wrong)
    check(elapsed < 3.0, "the 50 calls ran concurrently (%.2f s; one after another would take 5.1 s)" % elapsed,
          "%.2f s" % elapsed)
    check(order != sorted(order), "answers came back out of order", order[:10])

    # A connection the server drops: a waiting call fails at once, later calls too; none hangs.
    doomed = Client(host, int(port), token=args.token)
    box = {}
    waiter = threading.Thread(target=lambda: box.update(error=error_of(lambda: echo(doomed, timeout=5.0,
                                                                                 delay_ms=3000))))
    waiter.start()
    time.sleep(0.2)
    started = time.monotonic()
    doomed._send_frame(HEADER.pack(0, 1001, 9, 0))  # frame type 9 is not ttrpc: the server closes the connection
    waiter.join(timeout=4)
    error = box.get("error")
    check(not waiter.is_alive() and isinstance(error, ConnectionFailed) and time.monotonic() - started < 2.0,
          "dropped connection: the waiting call fails with ConnectionFailed (UNAVAILABLE)", describe(error))
    error = error_of(lambda: health(doomed))
    check(isinstance(error, ConnectionFailed), "dropped connection: a new call fails at once", describe(error))
    doomed.close()
    check(health(client) == "SERVING", "the other connection is unaffected")

    # An address where nothing listens.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    error = error_of(lambda: Client("127.0.0.1", closed_port, connect_timeout=2))
    check(isinstance(error, ConnectionFailed), "unreachable server: ConnectionFailed", describe(error))

    if args.expect_auth:
        check_auth(host, port, args.token)


def check_auth(host, port, token):
    """The server runs with --auth-token-file: Health is open, everything else needs the token."""
    with Client(host, int(port)) as anonymous:
        error = error_of(lambda: echo(anonymous))
        check(error is not None and error.name == "UNAUTHENTICATED"
              and error.message == "missing or invalid bearer token",
              "Echo without a token is UNAUTHENTICATED 'missing or invalid bearer token'", describe(error))
        got = health(anonymous)
        check(got == "SERVING", "Health without a token is SERVING", got)
        error = error_of(lambda: echo(anonymous, metadata={"authorization": "Bearer " + (token or "x") + "-wrong"}))
        check(error is not None and error.name == "UNAUTHENTICATED", "Echo with a wrong token is UNAUTHENTICATED",
              describe(error))
        if token:
            error = error_of(lambda: echo(anonymous, metadata={"authorization": "Basic " + token}))
            check(error is not None and error.name == "UNAUTHENTICATED",
                  "the right token without 'Bearer ' is UNAUTHENTICATED", describe(error))
            got = echo(anonymous, metadata={"authorization": "Bearer " + token}, message="ok").message
            check(got == "ok", "Echo with the token succeeds", got)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--addr", default="127.0.0.1:7100", help="host:port of the ttrpc server")
    parser.add_argument("--token", help="bearer token, when the server runs with --auth-token-file")
    parser.add_argument("--check", action="store_true", help="assert every result, exit 1 on a failure")
    parser.add_argument("--expect-auth", action="store_true",
                        help="the server requires a token: check calls without one (without --token: only those)")
    parser.add_argument("--health-only", action="store_true", help="only ask the server for its health")
    args = parser.parse_args()

    try:
        client = Client.connect(args.addr, token=args.token)
    except ConnectionFailed as error:
        print("example: %s" % error, file=sys.stderr)
        return 2
    with client:
        if args.health_only:
            print("%s health: %s" % (args.addr, health(client)))
            return 0
        if args.expect_auth and not args.token:
            # No token for a server that requires one: only Health answers.
            host, port = args.addr.rsplit(":", 1)
            check_auth(host, port, None)
            return report()
        try:
            seen = walkthrough(client)
        except RPCError as error:
            print("example: %s" % error, file=sys.stderr)
            return 1
        if not args.check:
            return 0
        print()
        run_checks(client, seen, args)
    return report()


def report():
    print("%d check(s) failed: %s" % (len(failures), "; ".join(failures)) if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
