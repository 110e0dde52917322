"""A small but realistic Django site for benches/memory.py: what a typical deployment imports and renders; its
/django/json view is also the django scenario of benches/bench.py.

    /admin/books/book/   the admin's changelist of the Book model (logged in with a session cookie)
    /api/books/          a Django REST framework ModelViewSet's list: all ~100 books as JSON
    /page/               a Django template with a loop over the books
    /django/json         a small JSON view from the request alone (no database): benches/bench.py's django
                         scenario, which reaches it through benches/apps/bench_app.py

INSTALLED_APPS has admin, auth, contenttypes, sessions, messages, staticfiles, rest_framework and djsite.books;
the sqlite database lives in $DJSITE_DIR, which `python -m djsite.prepare` fills (migrate, 100 books, an admin
user and a logged-in session) before any server starts. Every response carries `X-Worker-Pid`, the pid of the
process that rendered it, so the benchmark's driver knows which workers have answered.
"""
