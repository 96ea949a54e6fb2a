"""Operations on a running cluster: Ray jobs and recurring schedules (state, policy, Kubernetes export)."""
