"""The four stages (cache-check, router, claude-call, store) arrive with the stages issue."""
