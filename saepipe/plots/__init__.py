"""Figures for the report (matplotlib, Agg backend)."""
