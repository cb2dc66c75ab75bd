"""OpenAI-compatible router: validates, asks the scheduler, forwards to the chosen engine."""
