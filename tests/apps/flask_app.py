"""A small Flask app for tests/it/request_path/frameworks.rs: ferrule serves it from the test venv behind nginx.

Each route exercises one thing a real Flask deployment leans on: JSON, form parsing, multipart
uploads (werkzeug reads wsgi.input), streaming with stream_with_context, 404s and a 500.
"""

import hashlib
import time

from flask import Flask, Response, jsonify, request, stream_with_context

app = Flask(__name__)


@app.get("/json")
def json_endpoint():
    return jsonify(
        ok=True,
        args=request.args.to_dict(flat=False),
        method=request.method,
        scheme=request.scheme,
        host=request.host,
        remote_addr=request.remote_addr,
    )


@app.post("/form")
def form():
    return jsonify(form=request.form.to_dict(flat=False), content_type=request.content_type)


@app.post("/upload")
def upload():
    f = request.files["file"]
    digest = hashlib.sha256()
    size = 0
    while True:
        block = f.stream.read(65536)
        if not block:
            break
        size += len(block)
        digest.update(block)
    return jsonify(
        filename=f.filename,
        size=size,
        sha256=digest.hexdigest(),
        note=request.form.get("note"),
    )


@app.get("/stream")
def stream():
    @stream_with_context
    def generate():
        # request is only reachable inside the generator because of stream_with_context,
        # which is what this route checks.
        n = int(request.args.get("n", "3"))
        delay = float(request.args.get("delay", "0"))
        for i in range(n):
            yield f"part {i} of {n} for {request.path}\n"
            if delay and i + 1 < n:
                time.sleep(delay)

    return Response(generate(), mimetype="text/plain")


@app.get("/boom")
def boom():
    raise ValueError("flask boom from the exception route")
