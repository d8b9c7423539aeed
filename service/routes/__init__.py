"""One router per resource: generate, jobs, videos (OpenAI-compatible), models, health."""
