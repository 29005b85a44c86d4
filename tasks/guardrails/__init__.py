"""Rollout guardrails on live traffic: traffic plans (strategies), per-deployment metrics windows, the alarm
decision, the bake loop that watches alarms during each traffic step, the metrics sources (the local router's
admin route, Azure Monitor) and the rollout's picture.

Everything here but :mod:`tasks.guardrails.sources` and :mod:`tasks.guardrails.picture` is pure: no I/O, an
injected clock, so the whole decision logic is unit-tested without a server.
"""
