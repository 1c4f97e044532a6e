"""The inbound API (`runner serve`) that Zaps post invoices to, and its API keys."""
