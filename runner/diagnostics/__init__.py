"""doctor, explain, status and the support bundle."""
