"""Last-mile tooling: the submission zip, its reproduction, HELM and eval-time checks."""
