from django.contrib import admin

from djsite.books.models import Book


@admin.register(Book)
class BookAdmin(admin.ModelAdmin):
    list_display = ["title", "author", "isbn", "published", "pages", "price", "in_stock"]
    list_filter = ["in_stock", "published"]
    search_fields = ["title", "author", "isbn"]
    date_hierarchy = "published"
    # The whole table on one page, as the API and the template page show it.
    list_per_page = 100
