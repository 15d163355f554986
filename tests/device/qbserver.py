"""A minimal quorumblk device server for the device tests, run as a child
process so that the device outlives nothing and a test never serves its
own I/O.

Protocol: JSON lines. The first line on stdin is the configuration
{"paths": [...], "threshold": K, "quorum": {...Quorum options},
 "device": {...Device.start options}, "recover": N (optional: serve the
quiesced device N with Device.recover instead)}; the server answers
{"ok": true, "id": N, "path": "/dev/ublkbN", ...} once the device is LIVE,
or {"ok": false, "errno": E, "error": "..."}. Then each line is a command:
{"cmd": "events" | "status" | "info" | "ended" | "inject" | "stop",
"args": {...}} ("ended": has the device's queue loop ended, waiting up to
args.timeout seconds),
answered with {"ok": true, "result": ...}. "stop" (or EOF on stdin) stops
the device, closes the quorum and exits 0.
"""
import json
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", ".."))

from quorumblk import Quorum  # noqa: E402
from quorumblk.device import Device  # noqa: E402


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def error(e):
    return {"ok": False, "errno": getattr(e, "errno", None) or 0,
            "error": str(e), "class": type(e).__name__}


def main():
    cfg = json.loads(sys.stdin.readline())
    try:
        q = Quorum(cfg["paths"], cfg["threshold"], **cfg.get("quorum", {}))
    except Exception as e:  # report any failure to the test
        reply(error(e))
        return 1
    try:
        if cfg.get("recover") is not None:
            dev = Device.recover(q, cfg["recover"], **cfg.get("device", {}))
        else:
            dev = Device.start(q, **cfg.get("device", {}))
    except Exception as e:
        q.close()
        reply(error(e))
        return 1
    ended = threading.Event()

    def watch():
        dev.wait()
        ended.set()

    threading.Thread(target=watch, daemon=True).start()
    reply({"ok": True, "id": dev.id, "path": dev.path, "pid": os.getpid(),
           "queues": dev.queues, "depth": dev.depth,
           "block_size": dev.block_size, "max_io": dev.max_io})
    try:
        for line in sys.stdin:
            req = json.loads(line)
            cmd, args = req["cmd"], req.get("args", {})
            try:
                if cmd == "events":
                    result = q.events()
                elif cmd == "status":
                    result = q.status()
                elif cmd == "info":
                    result = dict(dev.info(), ended=ended.is_set())
                elif cmd == "ended":
                    result = ended.wait(args.get("timeout", 0))
                elif cmd == "inject":
                    q.inject(**args)
                    result = None
                elif cmd == "stop":
                    break
                else:
                    raise ValueError(f"unknown command {cmd!r}")
            except Exception as e:
                reply(error(e))
                continue
            reply({"ok": True, "result": result})
    finally:
        try:
            dev.stop()
            status = {"ok": True, "result": "stopped"}
        except Exception as e:
            status = error(e)
        events = q.events()
        q.close()
        status["events"] = events
        reply(status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
