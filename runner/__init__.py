"""runner: a declarative sync runner that turns unpaid invoices into Debitura collection cases."""

__version__ = "0.1.0"
