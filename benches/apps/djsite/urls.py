from django.contrib import admin
from django.urls import include, path
from rest_framework.routers import DefaultRouter

from djsite import views

router = DefaultRouter()
router.register("books", views.BookViewSet)

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include(router.urls)),
    path("page/", views.page, name="page"),
    # The load benchmark's view, mounted by benches/apps/bench_app.py under /django/.
    path("django/json", views.bench_json),
]
