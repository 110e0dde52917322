"""The Flask scenario of the benchmark: one small JSON endpoint, mounted by bench_app under /flask/."""

from flask import Flask, request

app = Flask(__name__)


@app.get("/flask/json")
def json_endpoint():
    # A dict return is serialised by Flask's JSON provider, as a typical API view would be; built from the path,
    # a header and the query, as the Django view of the django scenario is.
    return {"path": request.path, "client": request.headers.get("X-Bench-Client", ""), "query": request.args.to_dict()}
