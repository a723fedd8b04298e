"""The paper's ablations as a claims table (stage.py runs them, claims.py judges them)."""
