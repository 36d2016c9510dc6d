"""``dtclient login --bot-token FILE``: a bot's job (CI) logs in with a bot token.

The token (from ``dtadmin bots token``) authenticates the SSH connection as the
bastion's ``-dt-bot`` user (keyboard-interactive, one "Bot token" prompt); the dt-api
session then belongs to that bot, and asks for a short-lived certificate for a fresh
key of its own, never with a device. The rest is an ordinary login: the key and
certificate land in DT_HOME, and `dtclient config` / `dtclient ssh` use them.
"""

from __future__ import annotations

from bastion.protocol.errors import UsageError
from bastion.protocol.tokens import check_token_format
from client.api import BOT_USER, Credentials


def bot_credentials(token: str, bot: str | None) -> Credentials:
    """How a bot authenticates; ``bot`` (its name, from --user) is checked against the
    name the bastion says the token belongs to (:func:`check_bot_name`)."""
    return Credentials(BOT_USER, bot_token=check_token_format(token), bot_name=bot)


def check_bot_name(creds: Credentials, welcome_user: str | None) -> None:
    if creds.bot_name and welcome_user != creds.bot_name:
        raise UsageError(
            f'this bot token belongs to "{welcome_user}", not "{creds.bot_name}" (--user)'
        )


def refused(message: str) -> str:
    """What a refused bot token reads as: the generic password wording says nothing
    to a CI job, whose admin finds the reason in the audit log."""
    if "wrong user name, password or code" not in message:
        return message  # the bastion said why
    return (
        "the bastion refused the bot token: it is unknown, removed or expired, or its bot "
        "was removed or locked (an admin sees which: dtadmin audit ls --type token.use)"
    )
