"""Healing: a short distillation run in Lightning that recovers what pruning lost (`lorp_fx.heal`)."""
