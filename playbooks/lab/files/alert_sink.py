#!/usr/bin/python3
"""The lab's webhook receiver for Alertmanager: appends each notification's JSON body as one
line to a file, answers 200. Usage: alert_sink.py HOST PORT FILE."""

import http.server
import json
import sys
from pathlib import Path


class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with Path(sys.argv[3]).open("a") as out:
            out.write(json.dumps(json.loads(body), separators=(",", ":")) + "\n")
        self.send_response(200)
        self.end_headers()


http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Sink).serve_forever()
