#!/usr/bin/python3
"""A stand-in for CRIU 3.17.1, too old for ferry: answers `--version` and, over `swrk FD`,
the RPC version request; refuses every other request. Nothing else about CRIU is imitated."""
import socket
import sys

if sys.argv[1:2] in (["--version"], ["-V"]):
    print("Version: 3.17.1")
    sys.exit(0)
if sys.argv[1:2] != ["swrk"] or len(sys.argv) < 3:
    print("fake criu 3.17.1: unsupported command", file=sys.stderr)
    sys.exit(1)

rpc = socket.socket(fileno=int(sys.argv[2]))
request = rpc.recv(65536)
# criu_req.type is field 1, a varint: a request starts 0x08 <type>.
kind = request[1] if len(request) > 1 and request[0] == 0x08 else 0
VERSION = 10
if kind == VERSION:
    # criu_resp {type: VERSION, success: true, version {major 3, minor 17, sublevel 1}}
    answer = bytes([0x08, VERSION, 0x10, 0x01, 0x52, 0x06, 0x08, 0x03, 0x10, 0x11, 0x20, 0x01])
else:
    message = b"fake criu 3.17.1 does not do this"
    # criu_resp {type: <kind>, success: false, cr_errmsg (field 9): message}
    answer = bytes([0x08, kind, 0x10, 0x00, 0x4A, len(message)]) + message
rpc.send(answer)
