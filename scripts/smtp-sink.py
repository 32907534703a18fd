#!/usr/bin/python3
"""A real SMTP server for tests (aiosmtpd): stores each accepted message as a file in
--dir and can refuse the first --fail-first messages with 451 (a relay that is down
for a while and recovers). Prints "listening <port>" once it accepts connections."""
import argparse, asyncio, os, signal, sys, time
from aiosmtpd.controller import Controller

class Sink:
    def __init__(self, directory, fail_first):
        self.directory, self.remaining, self.count = directory, fail_first, 0
    async def handle_DATA(self, server, session, envelope):
        if self.remaining > 0:
            self.remaining -= 1
            return "451 4.3.0 try again later"
        self.count += 1
        name = os.path.join(self.directory, "%06d.eml" % self.count)
        with open(name + ".tmp", "wb") as f:
            f.write(("X-Envelope-To: %s\r\n" % ",".join(envelope.rcpt_tos)).encode())
            f.write(envelope.original_content or envelope.content)
        os.rename(name + ".tmp", name)
        return "250 OK"

def main():
    # A parent may have blocked signals (posix_spawn inherits the mask): be stoppable.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--fail-first", type=int, default=0)
    a = p.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    controller = Controller(Sink(a.dir, a.fail_first), hostname="127.0.0.1", port=a.port)
    controller.start()
    print("listening %d" % a.port, flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()

if __name__ == "__main__":
    main()
