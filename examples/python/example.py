#!/usr/bin/python3
"""The integrator's walkthrough: health, a call with metadata and a deadline, a status
error, a deadline that expires. With --check it asserts each result (what CI runs).

    /usr/bin/python3 examples/python/example.py --addr 127.0.0.1:7100 [--token T] [--check] [--expect-auth]
"""
import argparse
import sys
import threading
import time

import generated

generated.load()
import echo_pb2  # noqa: E402
import health_pb2  # noqa: E402
from arbiter_ttrpc import Client, RPCError  # noqa: E402

HEALTH, ECHO = "grpc.health.v1.Health", "arbiter.echo.v1.Echo"
failures = []


def check(condition, what):
    print(("PASS " if condition else "FAIL ") + what)
    if not condition:
        failures.append(what)


def expect_error(call):
    try:
        call()
    except RPCError as error:
        return error
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--addr", default="127.0.0.1:7100")
    parser.add_argument("--token")
    parser.add_argument("--check", action="store_true", help="assert results, exit 1 on a failure")
    parser.add_argument("--expect-auth", action="store_true", help="the server requires --token")
    parser.add_argument("--health-only", action="store_true", help="only ask the server for its health")
    args = parser.parse_args()
    host, port = args.addr.rsplit(":", 1)
    client = Client(host, int(port), token=args.token)

    # 1. Health: open to everyone, even when the server requires a token.
    reply = client.call(HEALTH, "Check", health_pb2.HealthCheckRequest(), health_pb2.HealthCheckResponse, timeout=2)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print("%s health: %s" % (args.addr, status))
    if args.health_only:
        return 0
    check(status == "SERVING", "Health/Check = SERVING")

    # 2. A call with metadata and a deadline.
    request = echo_pb2.EchoRequest(message="hello from Python", blob=b"\x00\x01\xff")
    reply = client.call(ECHO, "Echo", request, echo_pb2.EchoResponse, timeout=2.0,
                        metadata=[("x-request-id", "py-1"), ("tenant", "acme")])
    print("echo: %r, metadata %s, deadline budget seen by the server %.3f s"
          % (reply.message, [(m.key, m.value) for m in reply.metadata], reply.deadline_remaining_nanos / 1e9))
    check(reply.message == "hello from Python" and reply.blob == b"\x00\x01\xff", "Echo round-trips message and blob")
    check([(m.key, m.value) for m in reply.metadata] == [("tenant", "acme"), ("x-request-id", "py-1")],
          "metadata echoed, sorted, without authorization")
    check(0 < reply.deadline_remaining_nanos <= 2_000_000_000, "the deadline reached the server")

    # 3. A status error: the server fails the call with PERMISSION_DENIED.
    try:
        client.call(ECHO, "Echo", echo_pb2.EchoRequest(fail_code=7, fail_message="not for you"), echo_pb2.EchoResponse, timeout=2)
        check(False, "fail_code=7 raises PERMISSION_DENIED")
    except RPCError as error:
        print("status error: %s" % error)
        check(error.name == "PERMISSION_DENIED" and error.message == "not for you", "fail_code=7 raises PERMISSION_DENIED")

    # 4. A deadline that expires: the server answers DEADLINE_EXCEEDED at 0.3 s.
    started = time.monotonic()
    try:
        client.call(ECHO, "Echo", echo_pb2.EchoRequest(delay_ms=2000), echo_pb2.EchoResponse, timeout=0.3)
        check(False, "a 2 s call with a 0.3 s deadline is DEADLINE_EXCEEDED")
    except RPCError as error:
        elapsed = time.monotonic() - started
        print("deadline: %s after %.2f s" % (error, elapsed))
        check(error.name == "DEADLINE_EXCEEDED" and elapsed < 1.3, "a 2 s call with a 0.3 s deadline is DEADLINE_EXCEEDED")

    if args.check:
        error = expect_error(lambda: client.call(ECHO, "Nope", echo_pb2.EchoRequest(), echo_pb2.EchoResponse, timeout=2))
        check(error is not None and error.name == "UNIMPLEMENTED" and error.message == "method Nope", "unknown method is UNIMPLEMENTED")

        # Many calls in flight on one connection, each answered with its own reply.
        results = {}

        def worker(i):
            r = client.call(ECHO, "Echo", echo_pb2.EchoRequest(message="m%d" % i, delay_ms=i % 5), echo_pb2.EchoResponse, timeout=5)
            results[i] = r.message

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        check(all(results.get(i) == "m%d" % i for i in range(50)), "50 concurrent calls on one connection")

        if args.expect_auth:
            anonymous = Client(host, int(port))
            error = expect_error(lambda: anonymous.call(ECHO, "Echo", echo_pb2.EchoRequest(), echo_pb2.EchoResponse, timeout=2))
            check(error is not None and error.name == "UNAUTHENTICATED", "Echo without the token is UNAUTHENTICATED")
            reply = anonymous.call(HEALTH, "Check", health_pb2.HealthCheckRequest(), health_pb2.HealthCheckResponse, timeout=2)
            check(reply.status == health_pb2.HealthCheckResponse.SERVING, "Health without the token is SERVING")
            anonymous.close()
    client.close()
    if failures:
        print("%d check(s) failed" % len(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
