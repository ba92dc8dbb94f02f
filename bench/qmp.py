"""Minimal QMP client for bench/replication.sh (plain socket + json, bounded by deadlines).

Usage: python3 qmp.py SOCKET mirror SRC_NODE TARGET_NODE TIMEOUT_S
  starts `blockdev-mirror` (sync full, copy-mode write-blocking, job id m0) and waits until
  the job is READY (BLOCK_JOB_READY event or query-block-jobs ready: true); exits 1 otherwise.
Usage: python3 qmp.py SOCKET check-mirror
  exits 0 when job m0 still exists, is ready (status ready), i.e. still mirroring.
"""
import json
import socket
import sys
import time


class Qmp:
    def __init__(self, path, timeout_s=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout_s)
        self.sock.connect(path)
        self.buf = b""
        self.events = []
        greeting = self._recv()
        assert "QMP" in greeting, greeting
        self.cmd("qmp_capabilities")

    def _recv(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("QMP socket closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        self.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        while True:
            msg = self._recv()
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise RuntimeError(f"{name}: {msg['error']}")
            return msg["return"]


def main():
    path, action = sys.argv[1], sys.argv[2]
    q = Qmp(path)
    if action == "mirror":
        src, tgt, timeout_s = sys.argv[3], sys.argv[4], float(sys.argv[5])
        q.cmd("blockdev-mirror", **{"job-id": "m0", "device": src, "target": tgt, "sync": "full",
                                    "copy-mode": "write-blocking", "filter-node-name": "mtop"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(e["event"] == "BLOCK_JOB_READY" for e in q.events):
                return 0
            jobs = q.cmd("query-block-jobs")
            if any(j["device"] == "m0" and j.get("ready") for j in jobs):
                return 0
            if not any(j["device"] == "m0" for j in jobs):
                print(f"mirror job vanished: {q.events}", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print("mirror job not READY before the deadline", file=sys.stderr)
        return 1
    if action == "check-mirror":
        jobs = [j for j in q.cmd("query-block-jobs") if j["device"] == "m0"]
        ok = bool(jobs) and jobs[0].get("ready") and jobs[0].get("status") == "ready"
        print(json.dumps(jobs))
        return 0 if ok else 1
    print(f"unknown action {action}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
