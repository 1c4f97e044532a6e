"""Talking to providers: HTTP, authentication, OAuth2."""
