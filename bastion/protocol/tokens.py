"""The one-time token format (signup and enrollment), shared by both programs.

``dtclient`` checks a pasted token before it connects, so a token cut off when copied
is named as such at once instead of failing as "unknown" after a password prompt.
"""

from __future__ import annotations

import re

from bastion.protocol.errors import TokenInvalid

TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")


def check_token_format(token: object) -> str:
    """Tell a truncated or mangled token apart from an unknown one, early and clearly."""
    if not isinstance(token, str) or not TOKEN_RE.fullmatch(token.strip()):
        raise TokenInvalid(
            "that does not look like a token: it should be 43 characters of letters, "
            "digits, '-' and '_' (was it cut off when copied?)"
        )
    return token.strip()
