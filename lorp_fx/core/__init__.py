"""The bottom layer: errors, the budget rule, plans, statistics, and plain facts about a model."""
