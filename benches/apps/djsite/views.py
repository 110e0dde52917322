from django.http import JsonResponse
from django.shortcuts import render
from rest_framework import serializers, viewsets

from djsite.books.models import Book


class BookSerializer(serializers.ModelSerializer):
    class Meta:
        model = Book
        fields = ["id", "title", "author", "isbn", "published", "pages", "price", "in_stock", "created"]


class BookViewSet(viewsets.ModelViewSet):
    # No pagination is configured: the list is every book.
    queryset = Book.objects.order_by("id")
    serializer_class = BookSerializer


def page(request):
    books = Book.objects.order_by("title")
    return render(request, "page.html", {"books": books, "in_stock": sum(b.in_stock for b in books)})


def bench_json(request):
    """The load benchmark's Django view (benches/bench.py, scenario django): a JSON answer built from the request
    alone, through the site's whole middleware stack (sessions, CSRF, common, auth, messages). It reads neither the
    session nor the user, so no request touches the database: the benchmark runs it without one."""
    return JsonResponse(
        {"path": request.path, "client": request.headers.get("X-Bench-Client", ""), "query": request.GET.dict()}
    )
