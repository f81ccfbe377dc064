"""What ``compile`` returns: query-aware predictors (``program``) and their save/load format (``artifact``)."""
