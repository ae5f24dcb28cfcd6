"""`abliterate run`: its stages (subject, finding, evaluation, gating, publishing) and their endings."""
