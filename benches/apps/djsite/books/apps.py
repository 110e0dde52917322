from django.apps import AppConfig


class BooksConfig(AppConfig):
    name = "djsite.books"
    label = "books"
