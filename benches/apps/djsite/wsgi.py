"""The WSGI entry point every server of benches/memory.py loads: `djsite.wsgi:application`."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djsite.settings")

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
