"""Finding the edit: candidate extraction, selection, the edit search, evaluation and the refusal judge."""
