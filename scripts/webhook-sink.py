#!/usr/bin/python3
"""A local stand-in for the push/SMS/email provider behind routing's webhook adapter, for
the demo (scripts/run.sh): answers every POST with 200, keeps one line per delivery
(idempotency key, signature present, body) in --log, and counts them by idempotency key
so a redelivery is visible as such. Standard library only."""
import argparse, http.server, json, os, signal, sys, threading, time

def main():
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=7199)
    p.add_argument("--log", required=True)
    p.add_argument("--parent-pid", type=int, help="stop once this process is gone (even after a kill -9 of it)")
    a = p.parse_args()
    seen, lock = set(), threading.Lock()
    out = open(a.log, "a", buffering=1)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            key = self.headers.get("Idempotency-Key", "")
            with lock:
                duplicate = key in seen
                seen.add(key)
                out.write(json.dumps({"key": key, "duplicate": duplicate,
                                      "signed": bool(self.headers.get("X-Arbiter-Signature")),
                                      "body": body.decode("utf-8", "replace")}) + "\n")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    if a.parent_pid:
        def watch():
            while os.getppid() == a.parent_pid:
                time.sleep(0.25)
            server.shutdown()
        threading.Thread(target=watch, daemon=True).start()
    print("listening %d" % a.port, flush=True)
    server.serve_forever()

if __name__ == "__main__":
    main()
