"""Running a model: loading, sources, dispatch, the demo, GGUF, chat templates, prompts, batching, hooks."""
