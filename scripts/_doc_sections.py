"""Marked sections of generated docs: one script owns a section of a page another script writes.

``splice(page, name, body)`` puts ``body`` between ``<!-- name -->`` and ``<!-- /name -->``
(appending the markers at the end the first time); ``keep(old_page, new_page)`` carries every
marked section of the old page into a freshly rendered one, so that regenerating the page does
not drop what other scripts wrote into it.
"""

from __future__ import annotations

import re

_SECTION = re.compile(r"<!-- (?P<name>[\w-]+) -->\n.*?<!-- /(?P=name) -->\n", re.S)


def splice(page: str, name: str, body: str) -> str:
    """``page`` with section ``name`` set to ``body``."""
    block = f"<!-- {name} -->\n{body.rstrip()}\n<!-- /{name} -->\n"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->\n.*?<!-- /{re.escape(name)} -->\n", re.S)
    if pattern.search(page):
        return pattern.sub(lambda _: block, page, count=1)
    return page.rstrip("\n") + "\n\n" + block


def keep(old_page: str, new_page: str) -> str:
    """``new_page`` plus every marked section of ``old_page``."""
    for m in _SECTION.finditer(old_page):
        body = m.group(0).split("\n", 1)[1].rsplit(f"<!-- /{m.group('name')} -->", 1)[0]
        new_page = splice(new_page, m.group("name"), body)
    return new_page
