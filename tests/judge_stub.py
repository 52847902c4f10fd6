"""A tiny OpenAI-compatible chat server on 127.0.0.1 for the autointerp tests.

Its "model" picks the judging policy:
- "perfect": explains a feature as the token marked most often (<<tok>>) and, when judging,
  says 1 exactly for the excerpts containing that token (as a whole space-separated word);
- "never": explains the same way but answers 0 for every excerpt;
- "prose": answers in words, with no list (unparsable);
- "flaky": fails the first request with HTTP 500, then behaves as "perfect".
Every request body is recorded in `server.requests`.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EXPLANATION = 'Fires on the token "{token}".'


def _explain(user: str) -> str:
    marked = collections.Counter(re.findall(r"<<(.+?)>>", user))
    return EXPLANATION.format(token=marked.most_common(1)[0][0] if marked else "?")


def _judge(system: str, user: str, policy: str) -> str:
    token = re.search(r'Fires on the token "(.+?)"', system).group(1)
    excerpts = re.findall(r"^\d+\. (.*)$", user, flags=re.M)
    if policy == "prose":
        return "Some of them, I think."
    return json.dumps([int(policy == "perfect" and f"{token} " in f"{e} ") for e in excerpts])  # whole words


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        policy = body["model"]
        if policy == "flaky" and len(self.server.requests) == 1:
            self.send_error(500, "try again")
            return
        policy = "perfect" if policy == "flaky" else policy
        system, user = (m["content"] for m in body["messages"])
        content = _judge(system, user, policy) if "JSON list" in system else _explain(user)
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):  # keep test output clean
        pass


def start() -> ThreadingHTTPServer:
    """Start the server in a daemon thread; its base URL is `server.url`; stop with shutdown()."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests = []
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
