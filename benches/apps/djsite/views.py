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
