"""The state store: ledger, runs, verdicts, connection health, tokens."""
