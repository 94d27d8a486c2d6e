"""What every HTTP route shares: parameter bounds, problem responses, the strict body model,
the app's storage and audit log, and the offline API docs."""
