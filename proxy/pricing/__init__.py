"""Prices: the cost of a usage (`cost`), the shipped price catalog (`catalog`), re-pricing a ledger (`what_if`)."""
