"""LLM-level evaluation of a bridged bundle and the reports (JSON, Markdown, plots) of every evaluation."""
