"""``python -m client``: dtclient, as ``dtclient login`` starts its detached agent."""

from client.cli import main

main()
