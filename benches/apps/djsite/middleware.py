"""The one piece of the site that exists for the benchmark: which process answered."""

import os


def worker_pid(get_response):
    def middleware(request):
        response = get_response(request)
        # Read per request, not at import: with a preloading server the import ran in another process.
        response["X-Worker-Pid"] = str(os.getpid())
        return response

    return middleware
