"""Budgets by window (day, week, month): the calendar, the refusal message, alerts and gauges."""
