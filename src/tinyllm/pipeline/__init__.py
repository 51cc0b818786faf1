"""tinyllm pipeline: recipes, the stage runner, the report (and the planner)."""
