"""Content filters: URL-domain and word blocklists from files, and PII masking.

Blocklist files hold one entry a line; blank lines and lines starting with '#' are skipped.
A domain matches its subdomains ('example.com' blocks 'www.example.com'). Words and phrases
match case-insensitively as whole words; an entry with non-ASCII letters (Japanese, ...) matches
as a substring, since such scripts have no spaces between words.

PII: e-mail addresses, phone numbers (with separators: '555-123-4567', '(03) 1234-5678',
'+1 555 123 4567') and IPv4 addresses are replaced by masks, counted per kind.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

EMAIL = re.compile(r'(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])')
_OCTET = r'(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)'
IPV4 = re.compile(rf'(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)')
PHONE = re.compile(r'(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?|\d{1,4}[ .-])\d{2,4}[ .-]\d{3,4}(?![\w])')
PII_PATTERNS = {'email': EMAIL, 'ip': IPV4, 'phone': PHONE}  # applied in this order


def read_list(path: str) -> list[str]:
    if not path:
        return []
    with open(path, encoding='utf-8') as f:
        return [s.strip() for s in f if s.strip() and not s.lstrip().startswith('#')]


class ContentRules:
    """Blocklists loaded once; `check` names a removal reason, `mask` replaces PII."""

    def __init__(self, c, domain_path: str, word_path: str):
        self.domains = {d.lower().lstrip('.') for d in read_list(domain_path)}
        words = [w.lower() for w in read_list(word_path)]
        spaced = [re.escape(w) for w in words if w.isascii()]
        unspaced = [re.escape(w) for w in words if not w.isascii()]
        parts = ([rf'(?<!\w)(?:{"|".join(sorted(spaced))})(?!\w)'] if spaced else []) + sorted(unspaced)
        self.words = re.compile('|'.join(parts)) if parts else None
        self.min_hits = c.min_blocked_words
        self.kinds = [k for k in PII_PATTERNS if k in {s.strip() for s in c.mask_pii.split(',')}]
        self.masks = {'email': c.email_mask, 'phone': c.phone_mask, 'ip': c.ip_mask}

    def blocked_domain(self, url) -> bool:
        if not self.domains or not isinstance(url, str) or not url:
            return False
        host = (urlsplit(url if '//' in url else '//' + url).hostname or '').lower()
        parts = host.split('.')
        return any('.'.join(parts[i:]) in self.domains for i in range(len(parts)))

    def check(self, text: str, url) -> str | None:
        if self.blocked_domain(url):
            return 'blocked_domain'
        if self.words is not None:
            hits = 0
            for _ in self.words.finditer(text.lower()):
                hits += 1
                if hits >= self.min_hits:
                    return 'blocked_words'
        return None

    def mask(self, text: str) -> tuple[str, dict[str, int]]:
        """(text with PII replaced, {kind: replacements} for kinds that occurred)."""
        counts = {}
        for kind in self.kinds:
            text, n = PII_PATTERNS[kind].subn(self.masks[kind], text)
            if n:
                counts[kind] = n
        return text, counts
