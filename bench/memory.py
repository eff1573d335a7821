#!/usr/bin/env python3
"""Resident memory of a `bus server` under hostile loads (BENCHMARKS.md, "Memory under
hostile load").

Each run starts the given binary as `bus server` on a fresh temporary directory
(namespace `a`, plus the flags after `--`), attacks it, and prints the server's resident
memory from /proc/<pid>/status: before (VmRSS), the peak during the attack (VmHWM) and
what is still held 2 and 5 seconds after it.

    bench/memory.py BUS publish --body tiny              # 8 MiB of {"subject":"a.b"}
    bench/memory.py BUS publish --body tiny --events 10000 --concurrent 4
    bench/memory.py BUS publish --body medium --concurrent 4   # 1,000-byte payloads
    bench/memory.py BUS publish --body tiny -- --max-batch 500000
    bench/memory.py BUS subscribers --count 500 --log-mib 300 --payload 8000
"""

import argparse
import http.client
import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time

MIB = 1 << 20


def status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon"):
                fields[name] = int(value.split()[0]) * 1024
    return fields


def mib(n):
    return f"{n / MIB:.1f} MiB"


class Server:
    def __init__(self, binary, flags):
        self.data = tempfile.mkdtemp(prefix="bus-memory-")
        self.proc = subprocess.Popen(
            [binary, "server", "--addr", "127.0.0.1:0", "--path", self.data, "--namespaces", "a"]
            + flags,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in self.proc.stderr:
            found = re.search(r"addr=127\.0\.0\.1:(\d+)", line)
            if "bus server listening" in line and found:
                self.port = int(found.group(1))
                break
        else:
            raise SystemExit("the server did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def status(self):
        return status(self.proc.pid)

    def request(self, method, path, body=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        connection.request(method, path, body=body, headers={"content-type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response.status, data

    def settled(self, seconds):
        time.sleep(seconds)
        return self.status()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.data, ignore_errors=True)


def batch(event, count):
    return b"[" + b",".join([event] * count) + b"]"


def publish(args, server):
    if args.body == "tiny":
        event = b'{"subject":"a.b"}'
    else:
        event = json.dumps({"subject": "a.b", "payload": {"text": "x" * args.payload}}).encode()
    count = args.events or (args.bytes - 2) // (len(event) + 1)
    body = batch(event, count)
    base = server.settled(1.0)
    statuses = []
    threads = [
        threading.Thread(target=lambda: statuses.append(server.request("POST", "/", body)[0]))
        for _ in range(args.concurrent)
    ]
    started = time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.time() - started
    peak = server.status()["VmHWM"]
    after2 = server.settled(2.0)
    after5 = server.settled(3.0)
    print(
        f"{args.concurrent} x {len(body)} bytes ({count} events of {len(event)} bytes): "
        f"answers {sorted(statuses)} in {took:.2f} s"
    )
    print(
        f"  before {mib(base['VmRSS'])}; peak +{mib(peak - base['VmRSS'])}; "
        f"held after 2 s +{mib(after2['VmRSS'] - base['VmRSS'])}, "
        f"after 5 s +{mib(after5['VmRSS'] - base['VmRSS'])}"
    )


def subscribers(args, server):
    event = json.dumps({"subject": "a.b", "payload": {"text": "x" * args.payload}}).encode()
    body = batch(event, (8 * MIB - 2) // (len(event) + 1))
    for _ in range(max(1, args.log_mib * MIB // len(body))):
        answer, _ = server.request("POST", "/", body)
        assert answer == 202, answer
    base = server.settled(3.0)
    sockets = []
    for _ in range(args.count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", server.port))
        s.sendall(b"GET /?subject=a.>&start=oldest HTTP/1.1\r\nHost: x\r\n\r\n")
        sockets.append(s)
    previous = 0
    for _ in range(20):
        now = server.settled(1.0)
        if abs(now["VmRSS"] - previous) < MIB:
            break
        previous = now["VmRSS"]
    held = now["VmRSS"] - base["VmRSS"]
    peak = now["VmHWM"] - base["VmRSS"]
    print(
        f"{args.count} subscribers that never read, start=oldest on {args.log_mib} MiB of "
        f"{len(event)}-byte events: before {mib(base['VmRSS'])}; held +{mib(held)} "
        f"({held / args.count / 1024:.0f} KiB each); peak +{mib(peak)} "
        f"({peak / args.count / 1024:.0f} KiB each)"
    )
    for s in sockets:
        s.close()
    after = server.settled(5.0)
    answer, _ = server.request("POST", "/", b'{"subject":"a.after"}')
    print(f"  5 s after they left: +{mib(after['VmRSS'] - base['VmRSS'])}; a publish: {answer}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("binary")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("publish")
    p.add_argument("--body", choices=["tiny", "medium"], default="tiny")
    p.add_argument("--bytes", type=int, default=8 * MIB, help="body size (default 8 MiB)")
    p.add_argument("--events", type=int, default=0, help="events per batch (default: fill --bytes)")
    p.add_argument("--payload", type=int, default=1000, help="payload bytes of medium events")
    p.add_argument("--concurrent", type=int, default=1)
    s = commands.add_parser("subscribers")
    s.add_argument("--count", type=int, default=500)
    s.add_argument("--log-mib", type=int, default=300)
    s.add_argument("--payload", type=int, default=8000)
    for sub in (p, s):
        sub.add_argument("flags", nargs="*", help="`bus server` flags, after --")
    args = parser.parse_args()
    server = Server(args.binary, args.flags)
    try:
        (publish if args.command == "publish" else subscribers)(args, server)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
