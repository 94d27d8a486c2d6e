"""What every HTTP route shares: parameter bounds and the offline API docs."""
