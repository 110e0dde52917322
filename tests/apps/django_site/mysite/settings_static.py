"""The test site with Django's admin and staticfiles installed, as `django-admin startproject` makes it, so
`manage.py collectstatic` gathers the admin's CSS into STATIC_ROOT (given in the environment) for
tests/it/request_path/frameworks.rs to serve through nginx."""

import os

from .settings import *  # noqa: F403 (the base settings, extended below)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
]

STATIC_URL = "/static/"
STATIC_ROOT = os.environ["STATIC_ROOT"]
