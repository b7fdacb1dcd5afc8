"""Usage reports from the shared ledger: per team and key, per window (`/admin/usage`, `llm-proxy usage`)."""
