"""Settings for the minimal Django site tests/it/request_path/frameworks.rs serves through ferrule and nginx.

No database: sessions live in signed cookies, so the site runs from a read-only checkout and
parallel tests share nothing but the code.
"""

from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent

# A test-only key; nothing signed with it leaves the test run.
SECRET_KEY = "ferrule-tests-not-a-secret-0123456789abcdefghijklmnopqrstuvwxyz"
DEBUG = False
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = []

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]

SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"

ROOT_URLCONF = "mysite.urls"
WSGI_APPLICATION = "mysite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": False,
    }
]

DATABASES = {}

USE_TZ = True

# Uploads above this go to a temp file; the test's upload is larger, so that path is exercised.
FILE_UPLOAD_MAX_MEMORY_SIZE = 256 * 1024

# With DEBUG off Django only mails request errors; send them to stderr (ferrule's log) instead.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"django": {"handlers": ["stderr"], "level": "WARNING"}},
}
