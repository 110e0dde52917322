"""URL routes of the test site, one per behaviour tests/it/request_path/frameworks.rs checks."""

from django.urls import path

from . import views

urlpatterns = [
    path("form/", views.form, name="form"),
    path("counter/", views.counter, name="counter"),
    path("upload/", views.upload, name="upload"),
    path("stream/", views.stream, name="stream"),
]
