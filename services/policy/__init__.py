"""The policy service: Cedar policies, authorization decisions and promotion gates."""
