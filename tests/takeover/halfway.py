"""A new uproxy that dies half-way: ``python -m tests.takeover.halfway STATE_DIR``.

Says hello as a real one would, waits until the running uproxy has paused
everything and sent its offer and the first fds, then exits without saying
``owned``. Prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from uproxy.proxy.handover import netns_id
from uproxy.takeover import VERSION, FrameDecoder, encode


def main(argv: list[str]) -> int:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(os.path.join(argv[0], "takeover.sock"))
    sock.sendall(encode({"type": "hello", "version": VERSION, "netns": netns_id()}))
    decoder, frames, fds = FrameDecoder(), [], 0
    while not any(f["type"] == "fds" for f in frames):
        data, received, _, _ = socket.recv_fds(sock, 1 << 16, 253)
        for fd in received:
            os.close(fd)
        fds += len(received)
        if not data:
            break
        frames += decoder.feed(data)
    offer = next((f for f in frames if f["type"] == "offer"), {})
    print(json.dumps({"offered": offer.get("fds", 0), "received": fds,
                      "kinds": sorted({i["kind"] for i in offer.get("items", [])})}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
