"""The sample model (predictive maintenance) and its build recipe; bundles live in bundles/."""
