"""The data step of benches/memory.py, run once before any server starts: `python -m djsite.prepare`
(from benches/apps, with DJSITE_DIR set).

Creates the sqlite database (migrate), 100 books, an admin user and a logged-in session for it, then renders
each endpoint once with Django's test client: that checks the site works before it is measured, and compiles and
caches whatever the servers will import, so the first server started pays no more for it than the last.
Prints one JSON line: {"cookie": "sessionid=..."}.
"""

import datetime
import decimal
import json
import os
import random
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djsite.settings")

import django  # noqa: E402

BOOKS = 100
# What each endpoint's answer must contain (bytes, count), shared with the driver in benches/memory.py.
ENDPOINTS = {
    "admin": ("/admin/books/book/", b'name="_selected_action"', BOOKS),
    "api": ("/api/books/", b'"isbn":', BOOKS),
    "page": ("/page/", b'<li class="book', BOOKS),
}

WORDS = (
    "river night garden glass silent winter paper house iron letter summer empty stone city light forest "
    "salt machine orchard harbour"
).split()
AUTHORS = ["A. Moreau", "B. Okafor", "C. Lindqvist", "D. Ferreira", "E. Novak", "F. Tanaka", "G. Byrne"]


def main() -> int:
    django.setup()
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.auth.models import User
    from django.contrib.sessions.backends.db import SessionStore
    from django.core.management import call_command
    from django.test import Client

    from djsite.books.models import Book

    call_command("migrate", interactive=False, verbosity=0)
    rng = random.Random(13)
    Book.objects.all().delete()
    Book.objects.bulk_create(
        Book(
            title=f"The {rng.choice(WORDS)} {rng.choice(WORDS)} {i}",
            author=rng.choice(AUTHORS),
            isbn=f"978{i:010d}",
            published=datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(27000)),
            pages=rng.randrange(90, 900),
            price=decimal.Decimal(rng.randrange(500, 6000)) / 100,
            in_stock=rng.random() < 0.8,
        )
        for i in range(1, BOOKS + 1)
    )
    user = User.objects.filter(username="admin").first() or User.objects.create_superuser(
        "admin", "admin@example.com", "benchmark"
    )
    # A logged-in session as django.contrib.auth.login() leaves it, without a request to log in with.
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.save()

    from django.conf import settings

    cookie = f"{settings.SESSION_COOKIE_NAME}={session.session_key}"
    client = Client(HTTP_COOKIE=cookie)
    for name, (path, marker, count) in ENDPOINTS.items():
        resp = client.get(path)
        body = resp.content
        if resp.status_code != 200 or body.count(marker) != count:
            print(
                f"{name} {path}: HTTP {resp.status_code}, {body.count(marker)} x {marker!r} (want {count}): "
                f"{body[:300]!r}",
                file=sys.stderr,
            )
            return 1
    print(json.dumps({"cookie": cookie}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
