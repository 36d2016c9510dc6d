"""The contract both programs share: wire messages, errors, certificate parsing and
extension names, the token format, the login quote's data, durations and terminal
output. It imports nothing else of the project, and ``client/`` imports nothing of
``bastion`` but this (checked by import-linter in ``make lint``)."""
