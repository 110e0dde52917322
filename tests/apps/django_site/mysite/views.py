"""Views of the test site: CSRF-protected form, cookie session counter, upload, streaming."""

import hashlib
import time

from django.http import HttpResponse, HttpResponseNotAllowed, JsonResponse, StreamingHttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt


def form(request):
    # GET renders {% csrf_token %} (and sets the csrftoken cookie); a POST only gets here when
    # CsrfViewMiddleware accepted its token, otherwise the middleware answers 403.
    if request.method == "POST":
        return HttpResponse(f"thanks {request.POST.get('name', '')}", content_type="text/plain")
    return render(request, "form.html")


def counter(request):
    count = request.session.get("count", 0) + 1
    request.session["count"] = count
    return JsonResponse({"count": count})


# Exempt so the test of multipart parsing stands alone; CSRF has its own test on form/.
@csrf_exempt
def upload(request):
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    f = request.FILES["file"]
    digest = hashlib.sha256()
    size = 0
    for chunk in f.chunks():
        size += len(chunk)
        digest.update(chunk)
    return JsonResponse(
        {"name": f.name, "size": size, "sha256": digest.hexdigest(), "note": request.POST.get("note")}
    )


def stream(request):
    n = int(request.GET.get("n", "3"))
    delay = float(request.GET.get("delay", "0"))

    def lines():
        for i in range(n):
            yield f"django line {i}\n"
            if delay and i + 1 < n:
                time.sleep(delay)

    return StreamingHttpResponse(lines(), content_type="text/plain")
