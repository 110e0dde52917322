"""The Flask scenario of the benchmark: one small JSON endpoint, mounted by bench_app under /flask/."""

from flask import Flask

app = Flask(__name__)


@app.get("/flask/json")
def json_endpoint():
    # A dict return is serialised by Flask's JSON provider, as a typical API view would be.
    return {"message": "hello world", "ok": True, "items": [1, 2, 3, 4, 5]}
